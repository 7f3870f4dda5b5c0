"""A seeded generator of short, natural English sentences for flite to speak.

Templates (grouped by topic) x vocabulary. Numbers are written as words, exactly as flite speaks
them, so a sentence is its own transcript. The topic answers "What is the speaker talking about?".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# --- vocabulary ----------------------------------------------------------------------------------

HOURS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
TIME_FORMS = ("{} o'clock", "half past {}", "a quarter past {}", "a quarter to {}", "{} thirty", "{} fifteen",
              "{} forty five")

VOCABULARY: dict[str, tuple[str, ...]] = {
    "room": ("kitchen", "living room", "bedroom", "bathroom", "garage", "hallway", "office", "basement",
             "dining room", "guest room", "attic", "laundry room"),
    "device": ("ceiling light", "heater", "fan", "television", "radio", "oven", "dishwasher", "washing machine",
               "coffee maker", "air conditioner", "printer", "speaker", "lamp", "kettle"),
    "time": tuple(form.format(hour) for form in TIME_FORMS for hour in HOURS),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "future": ("tomorrow", "tonight", "this evening", "next week", "on Friday", "on Monday", "this weekend",
               "next Sunday", "tomorrow morning", "next month"),
    "past": ("yesterday", "last night", "this morning", "last week", "on Sunday", "two days ago",
             "last summer", "an hour ago", "on Tuesday"),
    "name": ("Anna", "David", "Maria", "Peter", "Sarah", "James", "Emma", "Thomas", "Laura", "Michael",
             "Olivia", "Daniel", "Sophie", "Robert", "Alice", "Henry", "Lucy", "George"),
    "relative": ("sister", "brother", "mother", "father", "grandmother", "grandfather", "uncle", "aunt",
                 "cousin", "neighbor", "friend", "boss"),
    "person": ("the doctor", "the teacher", "the manager", "the plumber", "the new student", "the driver",
               "my sister", "my brother", "our neighbor", "my uncle", "the nurse", "the mechanic"),
    "food": ("soup", "pasta", "rice", "bread", "apples", "cheese", "chicken", "salad", "pancakes", "carrots",
             "tomatoes", "eggs", "fish", "potatoes", "oranges", "beans", "milk", "butter"),
    "dish": ("soup", "pasta", "rice", "stew", "pie", "curry", "pizza", "cake", "bread", "lasagna"),
    "pot_dish": ("soup", "stew", "rice", "curry", "sauce", "pasta"),
    "bowl_dish": ("soup", "pasta", "rice", "stew", "curry", "salad", "noodles"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "brown", "silver", "gray", "purple",
              "pink", "dark blue"),
    "object": ("umbrella", "house key", "jacket", "book", "phone charger", "backpack", "watch", "wallet",
               "notebook", "map", "bicycle", "scarf", "suitcase", "laptop", "hat", "ticket"),
    "place": ("the station", "the library", "the park", "the market", "the airport", "the museum",
              "the beach", "the hospital", "the bakery", "the post office", "the bank", "the school",
              "the cinema", "the pharmacy", "the stadium", "the hotel"),
    "city": ("Boston", "Chicago", "Denver", "Seattle", "London", "Paris", "Madrid", "Berlin", "Toronto",
             "Dallas", "Rome", "Vienna", "Dublin", "Miami", "Houston", "Sydney"),
    "few": ("two", "three", "four", "five", "six"),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
               "fifteen", "twenty", "twenty five", "thirty", "forty"),
    "minutes": ("five", "ten", "fifteen", "twenty", "twenty five", "thirty", "forty", "forty five"),
    "price": ("five", "nine", "twelve", "fifteen", "twenty", "thirty", "forty nine", "sixty", "ninety nine"),
    "degrees": ("eighteen", "nineteen", "twenty", "twenty one", "twenty two", "twenty three"),
    "ordinal": ("first", "second", "third", "fourth", "fifth", "sixth"),
    "weather": ("sunny", "rainy", "cloudy", "windy", "cold", "warm", "foggy", "snowy", "hot", "stormy"),
    "animal": ("dog", "cat", "horse", "cow", "bird", "duck", "rabbit", "goat", "owl", "fox", "squirrel", "pig"),
    "animals": ("dogs", "cats", "horses", "cows", "birds", "ducks", "rabbits", "goats", "sheep", "geese",
                "deer", "pigs"),
    "instrument": ("piano", "guitar", "violin", "drums", "flute", "trumpet", "cello", "saxophone"),
    "sport": ("football", "tennis", "basketball", "baseball", "hockey", "volleyball"),
}

# topic answer -> templates; `{slot:2}` is a second value of the same slot, different from the first
TEMPLATES: dict[str, tuple[str, ...]] = {
    "things at home": (
        "Please turn off the {room} {device} at {time}.",
        "Turn on the {device} in the {room}, please.",
        "Could you close the {room} window before {time}?",
        "The {device} in the {room} is making a strange noise.",
        "Did you remember to switch off the {device} {past}?",
        "The {room} {device} stopped working again {past}.",
        "We are going to paint the {room} {color} {future}.",
        "Someone left the {room} door open all night.",
        "Set the heating to {degrees} degrees in the {room}.",
    ),
    "the weather": (
        "It will be {weather} in {city} on {weekday}.",
        "The forecast says it will be {weather} and {weather:2} {future}.",
        "Take an umbrella, it might rain in {city} {future}.",
        "The wind was so strong that the {color} gate blew open.",
        "It was too {weather} to go to {place} {past}.",
        "Snow is expected in {city} early on {weekday} morning.",
        "The temperature will drop to {degrees} degrees {future}.",
    ),
    "food and cooking": (
        "Add {few} cups of water to the {pot_dish}.",
        "We are having {food} and {food:2} for dinner {future}.",
        "The {dish} needs another {minutes} minutes in the oven.",
        "Please buy some {food} on the way home.",
        "I would like a bowl of {bowl_dish} with some bread.",
        "We have run out of {food} again.",
        "My {relative} makes the best {dish} in {city}.",
        "Can you put the {food} in the fridge?",
    ),
    "travel": (
        "The train to {city} leaves at {time}.",
        "Our flight to {city} was delayed by {minutes} minutes.",
        "Turn left at {place} and walk for {minutes} minutes.",
        "How do I get from {place} to {place:2}?",
        "The bus to {place} comes every {minutes} minutes.",
        "We drove to {city} in a {color} car {past}.",
        "Is this the right platform for the train to {city}?",
        "I will land in {city} at {time} on {weekday}.",
    ),
    "plans and appointments": (
        "The meeting with {person} starts at {time} on {weekday}.",
        "Remind me to call {person} {future} at {time}.",
        "{name} will pick up the children at {time}.",
        "My appointment with {person} is on {weekday} at {time}.",
        "Can we move the meeting to {weekday} afternoon?",
        "The party starts at {time}, so please do not be late.",
        "{name} and {name:2} are coming for lunch {future}.",
    ),
    "shopping": (
        "I bought {number} {color} shirts at the market.",
        "The {object} costs {price} dollars.",
        "Do they sell {food} at the shop on the corner?",
        "I need a new {object} before the trip to {city}.",
        "Is the {color} {object} on sale this week?",
        "The store near {place} closes at {time}.",
    ),
    "animals": (
        "The {animal} is sleeping under the {color} car.",
        "A small {animal} ran across the road near {place}.",
        "We saw {number} {animals} near the river {past}.",
        "My {relative} has a {color} {animal} called {name}.",
        "The {animals} on the farm are hungry this morning.",
        "Please do not feed the {animals} near the river.",
    ),
    "sports and exercise": (
        "I walk for {minutes} minutes every morning.",
        "The {sport} game starts at {time} {future}.",
        "{name} runs faster than anyone else on the {sport} team.",
        "Drink a glass of water after you exercise.",
        "The swimming pool opens at {time} on {weekday}.",
        "We won the {sport} match by {number} points.",
    ),
    "work and school": (
        "Please send the report to {person} before {weekday}.",
        "The printer on the {ordinal} floor is out of paper.",
        "Class begins at {time} in room {number}.",
        "Please study chapter {number} before the next lesson.",
        "{name} finished the project {past}.",
        "The {ordinal} exam is on {weekday} morning.",
    ),
    "lost things": (
        "Where did you put the {color} {object}?",
        "Have you seen my {object} anywhere?",
        "I left my {object} at {place} {past}.",
        "Could you help me carry the {object} to the {room}?",
        "{name} found a {color} {object} in the {room}.",
    ),
    "music and entertainment": (
        "The concert in {city} begins at {time}.",
        "Let us watch a movie at home {future}.",
        "{name} is learning to play the {instrument}.",
        "Turn the music down, the baby is sleeping.",
        "My {relative} plays the {instrument} in a small band.",
        "The show in {city} was sold out {past}.",
    ),
}

SLOT = re.compile(r"\{(\w+)(?::(\d))?\}")


@dataclass(frozen=True)
class Sentence:
    text: str
    topic: str


def fill(template: str, rng: np.random.Generator) -> str:
    chosen: dict[str, list[str]] = {}

    def value(match: re.Match) -> str:
        slot, nth = match.group(1), int(match.group(2) or 1)
        taken = chosen.setdefault(slot, [])
        while len(taken) < nth:
            options = [v for v in VOCABULARY[slot] if v not in taken]
            taken.append(options[int(rng.integers(len(options)))])
        return taken[nth - 1]

    text = SLOT.sub(value, template)
    return text[0].upper() + text[1:]


def all_templates() -> list[tuple[str, str]]:
    """(template, topic) in a fixed order."""
    return [(t, topic) for topic, templates in TEMPLATES.items() for t in templates]


def generate_sentences(seed: int, count: int) -> list[Sentence]:
    """`count` distinct sentences, a function of the seed only."""
    templates = all_templates()
    rng = np.random.default_rng([seed, 0x5E47])
    seen: set[str] = set()
    sentences = []
    attempts = 0
    while len(sentences) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"cannot make {count} distinct sentences from the templates")
        template, topic = templates[int(rng.integers(len(templates)))]
        text = fill(template, rng)
        if text not in seen:
            seen.add(text)
            sentences.append(Sentence(text, topic))
    return sentences
