"""salmonn-nano: the default model's training data, made locally from a seed, and its evaluation.

`python -m train.nano.make_data OUT_DIR --seed 0 [--quick]` writes the data set (data.py);
evaluate.py scores answers (word error rate, sound-event accuracy).
"""
