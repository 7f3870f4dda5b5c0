"""Real human speech with known words, from files that Debian packages install: a catalog for
training and evaluating salmonn-nano on people rather than flite.

Sources (`apt-get install -y --no-install-recommends hedgewars-data ktuberling-data klettres-data
alsa-utils`):
- hedgewars: the English voice packs of the game, one character's voice each (British, Classic,
  Default, HillBilly, Mobster, Pirate, Russian: English with a Russian accent, Singer, Surfer). A file's
  name says which game event the line is for ("Youllregretthat", "Enemydown"), not what is said: every
  pack says its own line (Default's Youllregretthat is "You're gonna wish you hadn't done that."), so
  `HEDGEWARS_LINES` holds a transcript per pack and file. Default_es, Default_pl, Default_ru,
  Default_uk and Russian_pl are not English.
- ktuberling: the English sound theme, one object name per file (`en.soundtheme`).
- klettres: English letter names and short words (`sounds.xml`) in two voices: a man (`en`) and a
  higher voice with another accent (`en_GB`).
- alsa: the speaker-test voice ("Front center", ...); Noise.wav is noise.

Every utterance of a speaker in `HELD_OUT_SPEAKERS` is kept out of training.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from salmonn_cli.audio import resample
from salmonn_cli.errors import SalmonnError

SAMPLE_RATE = 16000

HEDGEWARS_VOICES = Path("/usr/share/games/hedgewars/Data/Sounds/voices")
KTUBERLING_THEME = Path("/usr/share/ktuberling/sounds/en.soundtheme")
KLETTRES_DIR = Path("/usr/share/klettres")
ALSA_DIR = Path("/usr/share/sounds/alsa")

SOURCES = ("hedgewars", "ktuberling", "klettres", "alsa")
PACKAGES = {"hedgewars": "hedgewars-data", "ktuberling": "ktuberling-data",
            "klettres": "klettres-data", "alsa": "alsa-utils"}
# one file per source whose absence means the package is not installed
PACKAGE_MARKERS = {"hedgewars": HEDGEWARS_VOICES / "Default" / "Hello.ogg",
                   "ktuberling": KTUBERLING_THEME,
                   "klettres": KLETTRES_DIR / "en" / "sounds.xml",
                   "alsa": ALSA_DIR / "Front_Center.wav"}

HELD_OUT_SPEAKERS = ("hedgewars/British", "hedgewars/HillBilly", "hedgewars/Russian",
                     "ktuberling/en", "klettres/en_GB", "alsa")


class RealSpeechError(SalmonnError):
    """A package is missing, or its files are not the ones this catalog was written for."""


@dataclass(frozen=True)
class RealUtterance:
    path: str        # absolute path of the recording
    text: str        # what is said, in natural casing and punctuation
    speaker: str     # "hedgewars/Pirate", "ktuberling/en", "klettres/en_GB", "alsa"
    source: str      # "hedgewars", "ktuberling", "klettres", "alsa"


def catalog_order(item: RealUtterance) -> tuple[str, str, str]:
    return item.source, item.speaker, item.path


# --- hedgewars ------------------------------------------------------------------------------------

# Files of every pack that hold a grunt, a laugh, a cough or a jump's "hup!", never words.
HEDGEWARS_GRUNTS = frozenset({"Ooff1", "Ooff2", "Ooff3", "Ow1", "Ow2", "Ow3", "Ow4", "Jump1", "Jump2",
                              "Jump3", "Laugh", "Hmm", "PoisonCough", "PoisonMoan"})

# Pack -> file stem -> what the actor says. Written without listening, from two recognisers: Whisper
# tiny.en (greedy) and Whisper base (5 beams). A line is here when both give the same words, or when one
# of them gives exactly the words of the file name, or when their two transcripts differ only by a
# mishearing that the phrase and the game event settle ("Shiver me tenders" -> "timbers", "Fast blood"
# -> "First blood"). Lines that are a scream or a made-up word, or on which the recognisers disagree
# otherwise (or agree on "Bye!", their usual guess for an unclear shout) are left out, and so is a file
# whose bytes are those of a file already here (Default shares some recordings with Classic).
# The Robot pack is left out whole: a voice through a robot effect.
HEDGEWARS_LINES: dict[str, dict[str, str]] = {
    "British": {
        "Boring": "This is frightfully dull.",
        "Brilliant": "Truly brilliant, sir!",
        "Byebye": "Farewell, good sir!",
        "Coward": "You, sir, are a coward!",
        "Cutitout": "Desist immediately, sir!",
        "Drat": "Blast it all!",
        "Enemydown": "Take that, you witless buffoon!",
        "Excellent": "Tea and crumpets!",
        "Firepunch1": "Take this!",
        "Firstblood": "First blood!",
        "Flawless": "We have won unscathed.",
        "Gonnagetyou": "I'll get you!",
        "Hello": "Good day to you, sir.",
        "Hurry": "Time is short.",
        "Incoming": "Incoming!",
        "Kamikaze": "For Queen and Country!",
        "Missed": "It appears your aim is somewhat lacking, sir.",
        "Ohdear": "This is most unfortunate.",
        "Oops": "Whoopsie daisy.",
        "Revenge": "I have claimed my revenge!",
        "Runaway": "Run away!",
        "Sameteam": "Bloody fool! I'm on your side!",
        "Solong": "Parting is such sweet sorrow.",
        "Stupid": "You poor fool!",
        "Takecover": "Get down, boys!",
        "Thisoneismine": "This one is mine.",
        "Traitor": "That's quite simply not cricket, sir.",
        "Victory": "This day victory is ours!",
        "Watchit": "Watch it!",
        "Whatthe": "Good heavens!",
        "Yessir": "For Queen and Country!",
        "Youllregretthat": "I will have your head, you cur!",
    },
    "Classic": {
        "Amazing": "Amazing!",
        "Boring": "Boring.",
        "Byebye": "Bye bye!",
        "Comeonthen": "Come on then!",
        "Enemydown": "Enemy down!",
        "Excellent": "Excellent!",
        "Firstblood": "First blood!",
        "Flyaway": "No!",
        "Gonnagetyou": "I'm gonna get you!",
        "Grenade": "Goodnight!",
        "Hello": "Hello!",
        "Illgetyou": "I'll get you!",
        "Incoming": "Incoming!",
        "Justyouwait": "Just you wait!",
        "Nooo": "No!",
        "Ohdear": "Oh dear.",
        "Oops": "Oops.",
        "Reinforcements": "Reinforcements!",
        "Runaway": "Run away!",
        "Sameteam": "Same team!",
        "Thisoneismine": "This one is mine.",
        "Victory": "Victory!",
        "Watchit": "Watch it!",
        "Watchthis": "Watch this!",
        "Whatthe": "What the?",
        "Yessir": "Yes, sir!",
        "Youllregretthat": "You'll regret that.",
    },
    "Default": {
        "Boring": "This is so boring.",
        "Brilliant": "Fantastic!",
        "Byebye": "See ya!",
        "Comeonthen": "I'm waiting!",
        "Enemydown": "Got one!",
        "Excellent": "I make this look all too easy.",
        "Firepunch1": "Fire punch!",
        "Firepunch2": "Take this!",
        "Firstblood": "This is only the beginning.",
        "Flyaway": "No!",
        "Gonnagetyou": "You've just made my hit list.",
        "Grenade": "Oh no!",
        "Illgetyou": "You've ticked off the wrong hog, buddy.",
        "Incoming": "This is going to hurt!",
        "Justyouwait": "You're gonna pay for that.",
        "Missed": "Is that the best you can do?",
        "Nutter": "What are you doing?",
        "Revenge": "I got you back!",
        "Runaway": "Watch out!",
        "Sameteam": "I'm on your team!",
        "Solong": "So long.",
        "Stupid": "That was pathetic.",
        "Takecover": "Get down!",
        "Traitor": "Why, you backstabbing little...",
        "Victory": "Victory is ours!",
        "Watchit": "Watch where you're shooting!",
        "Watchthis": "Watch this!",
        "Whatthe": "What the?",
        "Yessir": "Yes, sir!",
        "Youllregretthat": "You're gonna wish you hadn't done that.",
    },
    "HillBilly": {
        "Flawless": "Ain't nobody touching me or my property.",
        "Hello": "What the hell we got going on here?",
        "Oops": "I'm so drunk.",
        "Takecover": "Best start kissing the ground, city slicker.",
        "Uh-oh": "Well, where's Conway Twitty when you need him?",
        "Watchit": "You got into Grandpa's moonshine again, didn't ya?",
    },
    "Mobster": {
        "Amazing": "Yeah, that was a good shot.",
        "Boring": "Hey, I'm bored here!",
        "Brilliant": "Brilliant.",
        "Bugger": "This just sucks.",
        "Byebye": "I'm out of here.",
        "Comeonthen": "Come on then, punk!",
        "Coward": "You're a spineless worm, you know that?",
        "Cutitout": "Back off!",
        "Enemydown": "Hey, I got him.",
        "Fire": "You want this, punk?",
        "Firepunch1": "Take this!",
        "Firstblood": "Oh look, I drew blood.",
        "Gonnagetyou": "Mark my words, kid, I'm gonna get ya.",
        "Grenade": "Are you kidding me?",
        "Hello": "Hello?",
        "Hurry": "You wanna do this thing or what?",
        "Illgetyou": "Tonight you're gonna be sleeping with the fishes.",
        "Incoming": "We got incoming, boys!",
        "Justyouwait": "Just you wait, you little punk.",
        "Leavemealone": "Buzz off, you little punk.",
        "Melon": "Yeah, kid, have a melon.",
        "Missed": "You are just terrible.",
        "Nooo": "No!",
        "Nutter": "What the hell was that?",
        "Oops": "Well, I screwed that one up.",
        "Ouch": "Ouch!",
        "Runaway": "Get out of here, boys!",
        "Sameteam": "I'm on your side, idiot!",
        "Solong": "This sucks!",
        "Takecover": "Hey, knuckleheads, take cover!",
        "Traitor": "You backstabbing little worm!",
        "Uh-oh": "Uh-oh.",
        "Watchit": "Watch where you're shooting.",
        "Whatthe": "What the?",
        "Yessir": "Just give the word, boss.",
        "Youllregretthat": "If I were you, buddy, I'd stop running.",
    },
    "Pirate": {
        "Amazing": "And that will send you back to Davy Jones' locker.",
        "Brilliant": "Shiver me timbers!",
        "Excellent": "Yo ho ho!",
        "Firepunch1": "Have some of this!",
        "Flyaway": "No!",
        "Gonnagetyou": "You son of a biscuit!",
        "Grenade": "By the seven seas!",
        "Illgetyou": "Dead men tell no tales!",
        "Incoming": "Batten down the hatches!",
        "Justyouwait": "I'll hang you from the yardarm!",
        "Leavemealone": "Go and scrub that poop deck!",
        "Nooo": "No!",
        "Solong": "It's all over for me now, lad.",
        "Stupid": "Ha ha! What a bloody fool!",
        "Thisoneismine": "I'll be taking this one, lads.",
        "Traitor": "You traitorous dog!",
        "Uh-oh": "Oh, bloody hell!",
        "Watchit": "Blue blistering barnacles! Watch where you're shooting!",
        "Whatthe": "What the?",
        "Youllregretthat": "You're in for it now, you scurvy cur!",
    },
    "Singer": {
        "Amazing": "Amazing!",
        "Brilliant": "Brilliant!",
        "Byebye": "Bye bye!",
        "Comeonthen": "Come on then!",
        "Coward": "Coward!",
        "Cutitout": "Cut it out!",
        "Excellent": "Excellent!",
        "Flyaway": "No!",
        "Gonnagetyou": "I'm gonna get you!",
        "Hello": "Hello!",
        "Illgetyou": "I'll catch you!",
        "Incoming": "Incoming!",
        "Justyouwait": "Just you wait!",
        "Melon": "Melon's away!",
        "Missed": "You missed!",
        "Nooo": "No!",
        "Revenge": "I have claimed my revenge!",
        "Runaway": "Run away!",
        "Takecover": "Take cover!",
        "Thisoneismine": "This one is mine!",
        "Uh-oh": "Uh-oh!",
        "Victory": "Victory!",
        "Whatthe": "What the?",
        "Yessir": "Yes, sir!",
    },
    "Surfer": {
        "Amazing": "Totally amazing, dude.",
        "Boring": "Dude, this is boring.",
        "Brilliant": "Awesome!",
        "Bugger": "That is totally weak, dude.",
        "Byebye": "Sayonara, dude!",
        "Coward": "Dude, what a wimp!",
        "Cutitout": "Dude, for real, cut it out.",
        "Drat": "Dude.",
        "Enemydown": "Dude, I totally got him.",
        "Fire": "Fire, man!",
        "Firepunch1": "Fire punch!",
        "Firstblood": "We're off to a totally awesome start, man.",
        "Flawless": "That was way too easy, man.",
        "Gonnagetyou": "You are so screwed now, dude!",
        "Hello": "Hello?",
        "Hurry": "Come on, man.",
        "Incoming": "Here it comes!",
        "Justyouwait": "Just you wait, man. Just you wait.",
        "Leavemealone": "Dude, leave me alone.",
        "Melon": "Dude, have a melon.",
        "Nooo": "No way!",
        "Nutter": "Dude, what are you doing?",
        "Oops": "Ehh, whoops.",
        "Reinforcements": "Somebody bought me a present.",
        "Revenge": "I got you back, man. I got you!",
        "Runaway": "Dude, get out of here!",
        "Sameteam": "Dude, I'm on your team!",
        "Solong": "I guess this is it, man.",
        "Stupid": "Dude, that was so lame.",
        "Thisoneismine": "I got this one, dude.",
        "Uh-oh": "Uh-oh.",
        "Victory": "Hey! We won!",
        "Watchthis": "Hey dude, check this out!",
        "Whatthe": "Wait, what?",
        "Youllregretthat": "You're gonna pay for that one, dude.",
    },
    "Russian": {
        "Amazing": "Incredible, comrade!",
        "Byebye": "I go now to join my fallen comrades.",
        "Comeonthen": "What are you waiting for?",
        "Drat": "Blast!",
        "Enemydown": "Enemy down!",
        "Excellent": "Excellent shot, comrade!",
        "Firstblood": "This is only the beginning.",
        "Gonnagetyou": "You should not have done that!",
        "Grenade": "Grenade!",
        "Hello": "Hello?",
        "Hurry": "Move it!",
        "Illgetyou": "I will get you for this.",
        "Incoming": "Incoming!",
        "Kamikaze": "For the motherland!",
        "Leavemealone": "Leave me be!",
        "Missed": "Ha! You missed!",
        "Oops": "Sorry!",
        "Ouch": "Ouch!",
        "Revenge": "Revenge is a dish best served cold.",
        "Runaway": "Run away, comrades!",
        "Sameteam": "We are on the same team!",
        "Solong": "So long, my comrades.",
        "Takecover": "Take cover!",
        "Thisoneismine": "This one is mine!",
        "Uh-oh": "Oh, this is going to hurt!",
        "Victory": "Victory is ours, my brothers!",
        "Watchit": "Watch it!",
    },
}


def hedgewars_utterances() -> list[RealUtterance]:
    items = []
    for pack, lines in HEDGEWARS_LINES.items():
        for stem, text in lines.items():
            path = HEDGEWARS_VOICES / pack / f"{stem}.ogg"
            if not path.is_file():
                raise RealSpeechError(f"{path} is missing: {PACKAGES['hedgewars']} is not the version "
                                      f"this catalog was written for (1.0.2)")
            items.append(RealUtterance(str(path), text, f"hedgewars/{pack}", "hedgewars"))
    return items


def hedgewars_stems(pack: str) -> set[str]:
    """The stems of a pack's recordings on disk."""
    return {p.stem for p in (HEDGEWARS_VOICES / pack).glob("*.ogg")}


# --- ktuberling -----------------------------------------------------------------------------------

# The theme names each file "<scene>_<object>" or "<object>"; the object is the word said, spelt as
# below where the name runs words together or misspells them.
KTUBERLING_SCENES = ("egypt_", "moon_", "pizzeria_", "tv_")
KTUBERLING_SPOKEN = {"palmtree": "palm tree", "fallingstar": "falling star", "sphynx": "sphinx",
                     "brocolli": "broccoli", "ufo": "UFO"}


def ktuberling_text(name: str) -> str:
    obj = name
    for scene in KTUBERLING_SCENES:
        obj = obj.removeprefix(scene)
    words = KTUBERLING_SPOKEN.get(obj, obj)
    return words[0].upper() + words[1:] + "."


def ktuberling_utterances() -> list[RealUtterance]:
    root = ElementTree.parse(KTUBERLING_THEME).getroot()
    items = []
    for sound in root.iter("sound"):
        path = KTUBERLING_THEME.parent / sound.get("file")
        text = ktuberling_text(sound.get("name"))
        items.append(RealUtterance(str(path), text, "ktuberling/en", "ktuberling"))
    return items


# --- klettres -------------------------------------------------------------------------------------

KLETTRES_LANGUAGES = ("en", "en_GB")        # one voice each
# "syllables" that are sounds, not words
KLETTRES_NOT_WORDS = frozenset({"AW", "CH", "TH"})


def klettres_utterances() -> list[RealUtterance]:
    items = []
    for language in KLETTRES_LANGUAGES:
        root = ElementTree.parse(KLETTRES_DIR / language / "sounds.xml").getroot()
        for group in ("alphabet", "syllables"):
            for block in root.iter(group):
                for sound in block.iter("sound"):
                    name = sound.get("name")
                    if name in KLETTRES_NOT_WORDS:
                        continue
                    # a letter is said by its name, and written as the letter
                    text = f"{name}." if group == "alphabet" else f"{name.capitalize()}."
                    path = KLETTRES_DIR / sound.get("file")
                    items.append(RealUtterance(str(path), text, f"klettres/{language}", "klettres"))
    return items


# --- alsa -----------------------------------------------------------------------------------------

ALSA_CHANNELS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
                 "Side_Left", "Side_Right")


def alsa_utterances() -> list[RealUtterance]:
    return [RealUtterance(str(ALSA_DIR / f"{channel}.wav"), channel.replace("_", " ").capitalize() + ".",
                          "alsa", "alsa")
            for channel in ALSA_CHANNELS]


# --- the catalog ----------------------------------------------------------------------------------

READERS = {"hedgewars": hedgewars_utterances, "ktuberling": ktuberling_utterances,
           "klettres": klettres_utterances, "alsa": alsa_utterances}


def missing_packages(sources: tuple[str, ...] = SOURCES) -> list[str]:
    """The Debian packages of `sources` whose files are not on this machine."""
    return sorted(PACKAGES[s] for s in sources if not PACKAGE_MARKERS[s].is_file())


def catalog(sources: tuple[str, ...] = SOURCES) -> list[RealUtterance]:
    """Every usable utterance of `sources`, sorted by source, speaker and path."""
    missing = missing_packages(sources)
    if missing:
        raise RealSpeechError(f"real speech needs Debian packages: apt-get install -y "
                              f"--no-install-recommends {' '.join(missing)}")
    items = [item for source in sources for item in READERS[source]()]
    absent = [item.path for item in items if not Path(item.path).is_file()]
    if absent:
        raise RealSpeechError(f"{len(absent)} catalogued recordings are missing, e.g. {absent[0]}")
    return sorted(items, key=catalog_order)


def is_held_out(item: RealUtterance) -> bool:
    return item.speaker in HELD_OUT_SPEAKERS


def train_items(items: list[RealUtterance] | None = None) -> list[RealUtterance]:
    """The utterances of speakers that may be trained on."""
    return [item for item in (catalog() if items is None else items) if not is_held_out(item)]


def held_out_items(items: list[RealUtterance] | None = None) -> list[RealUtterance]:
    """The utterances of `HELD_OUT_SPEAKERS`, for evaluation only."""
    return [item for item in (catalog() if items is None else items) if is_held_out(item)]


def load(item: RealUtterance, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The recording as mono float64 at `sample_rate` (the channels of a stereo file averaged)."""
    wave, rate = soundfile.read(item.path, dtype="float64", always_2d=True)
    return resample(wave.mean(axis=1), rate, sample_rate)


def seconds(item: RealUtterance) -> float:
    return soundfile.info(item.path).duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.real_speech",
                                     description="Count (or list) the real-speech catalog.")
    parser.add_argument("--list", action="store_true",
                        help="also print every utterance: speaker, seconds, path, text")
    args = parser.parse_args(argv)
    try:
        items = catalog()
    except RealSpeechError as exc:
        print(f"real_speech: error: {exc}", file=sys.stderr)
        return exc.exit_code
    per_speaker: dict[tuple[str, str], list[float]] = defaultdict(list)
    for item in items:
        duration = seconds(item)
        per_speaker[item.source, item.speaker].append(duration)
        if args.list:
            print(f"{item.speaker}\t{duration:.2f}\t{item.path}\t{item.text}")
    for (source, speaker), durations in sorted(per_speaker.items()):
        role = "held out" if speaker in HELD_OUT_SPEAKERS else "train"
        print(f"{speaker:24s} {len(durations):4d} utterances {sum(durations):7.1f} s  {role}")
    for source in SOURCES:
        durations = [d for (s, _), ds in per_speaker.items() if s == source for d in ds]
        print(f"{source:24s} {len(durations):4d} utterances {sum(durations):7.1f} s")
    held_out = sum(len(ds) for (_, speaker), ds in per_speaker.items() if speaker in HELD_OUT_SPEAKERS)
    total = sum(sum(ds) for ds in per_speaker.values())
    print(f"{'total':24s} {len(items):4d} utterances {total:7.1f} s  ({held_out} held out, "
          f"{len(per_speaker)} speakers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
