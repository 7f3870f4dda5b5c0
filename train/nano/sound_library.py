"""Real labelled recordings from Debian packages, as sound-event classes for salmonn-nano.

Every class lists its recordings by hand (file names checked one by one; ambiguous, synthetic-sounding,
duplicate or spoken files left out) and splits them into training and held-out recordings, the
held-out ones chosen to be other takes or other sources than the training ones where a class has them.

Sources (a missing package only removes its files; `missing_packages()` names it):
- gcompris-qt-data: clips inside Qt .rcc archives (read by `qt_resources`): instruments, farm
  animals, the memory-sound game's recordings;
- sonic-pi-samples: drums, tabla, cymbals, guitar, vinyl and a few effects (freesound.org, CC0);
- scratch: Scratch 1.4's sound library (animals, people, effects, instruments, music loops);
- wesnoth-1.16-data: ambiences, horn calls and battle effects;
- hedgewars-data: effects, the voice packs' laughs and coughs, and the game's music.

Six classes are events.py's own (bell, camera, beeping, hiss, rumble, music): real recordings join
them under the same name and wording. Camera and hiss got one new recording each; it is held out,
since events.py's renderers already train those classes. The freedesktop sounds events.py uses are
not listed again here.

Keywords follow events.py's rule: an answer names a class when it contains one of the class's
keywords at the start of a word, and no class's descriptions contain another class's keyword,
events.py's classes included.
"""
from __future__ import annotations

import argparse
import fnmatch
import io
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile

from salmonn_cli.audio import resample
from train.nano import events
from train.nano.qt_resources import QtResourceArchive

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Source:
    package: str
    root: Path
    in_archives: bool = False       # the files live inside the Qt .rcc archives under root


SOURCES = {
    "gcompris": Source("gcompris-qt-data", Path("/usr/share/gcompris-qt/rcc"), in_archives=True),
    "sonic-pi": Source("sonic-pi-samples", Path("/usr/share/sonic-pi/samples")),
    "scratch": Source("scratch", Path("/usr/share/scratch/Media/Sounds")),
    "wesnoth": Source("wesnoth-1.16-data", Path("/usr/share/games/wesnoth/1.16")),
    "hedgewars": Source("hedgewars-data", Path("/usr/share/games/hedgewars/Data")),
}


@dataclass(frozen=True)
class SoundClass(events.EventClass):
    """A sound-event class: events.EventClass's descriptions, plus its recordings.

    Recordings are "SOURCE:PATTERN" specs: a glob under the source's root, or for gcompris
    "ARCHIVE/GLOB" (ARCHIVE.rcc, GLOB matched against the member's file name). A file matched by
    both lists is held out."""
    train: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class SoundFile:
    cls: str
    path: str                       # the audio file, or the .rcc archive holding it
    member: str | None = None       # path inside the .rcc archive, else None

    @property
    def name(self) -> str:
        """A short unique name: source, then the path under its root (or archive and member file)."""
        path = Path(self.path)
        for key, source in SOURCES.items():
            if path.is_relative_to(source.root):
                relative = path.relative_to(source.root).as_posix()
                if self.member is not None:
                    relative += "/" + PurePosixPath(self.member).name
                return f"{key}/{relative}"
        return self.path if self.member is None else f"{self.path}/{self.member}"


def _joined(name: str, train: tuple[str, ...] = (), held_out: tuple[str, ...] = ()) -> SoundClass:
    """One of events.py's classes, with its wording, given real recordings."""
    e = events.EVENTS_BY_NAME[name]
    return SoundClass(e.name, e.captions, e.background, e.source, e.noun, e.keywords, train=train, held_out=held_out)


def _each(prefix: str, *names: str) -> tuple[str, ...]:
    return tuple(prefix + n for n in names)


GC_FARM = "gcompris:explore_farm_animals/"
GC_INSTRUMENTS = "gcompris:instruments/"
GC_MEMORY = "gcompris:memory-sound/"
WESNOTH = "wesnoth:data/core/sounds/"
HEDGEWARS = "hedgewars:Sounds/"
VOICES = "hedgewars:Sounds/voices/"

SOUND_CLASSES: tuple[SoundClass, ...] = (
    # --- animals ---
    SoundClass("dog", ("A dog is barking.", "A dog barks.", "Barking of a dog."),
               "a dog barks in the background", "A dog.", "a dog barking", ("dog", "bark"),
               train=(GC_FARM + "dog.ogg", GC_MEMORY + "LRBark_*"),
               held_out=("scratch:Animal/Dog*.wav",)),
    SoundClass("cat", ("A cat meows.", "A cat is meowing.", "Meowing of a cat."),
               "a cat meows in the background", "A cat.", "a cat meowing", ("cat", "meow", "kitten"),
               train=(GC_FARM + "cat.ogg", "scratch:Animal/Cat.mp3", "scratch:Animal/Meow.wav"),
               held_out=("scratch:Animal/Kitten.wav",)),
    # neighs, snorts and hooves alike, so the wording names only the animal
    SoundClass("horse", ("Sounds of a horse.", "A horse is heard.", "There is a horse nearby."),
               "a horse can be heard in the background", "A horse.", "a horse",
               ("horse", "neigh", "whinn", "gallop", "hoof", "hooves"),
               train=(GC_FARM + "horse.ogg", "scratch:Animal/HorseGallop.wav", WESNOTH + "horse-canter.wav",
                      WESNOTH + "horse-hit-*.ogg", WESNOTH + "horse-die.ogg"),
               held_out=("scratch:Animal/Horse.wav", WESNOTH + "horse-elf-canter.wav")),
    # songbirds, a crow and owls: "crow" is no keyword, since roosters crow
    SoundClass("bird", ("Birds are calling.", "A bird calls.", "Bird calls can be heard."),
               "birds call in the background", "A bird.", "a bird calling", ("bird", "chirp", "owl"),
               train=(WESNOTH + "ambient/birds1.ogg", WESNOTH + "ambient/birds2.ogg", "sonic-pi:misc_crow.flac",
                      GC_FARM + "owl.ogg"),
               held_out=("scratch:Animal/Bird.wav", WESNOTH + "ambient/birds3.ogg", "scratch:Animal/Owl.wav")),
    # wesnoth's "morning" ambience is a rooster's crow
    SoundClass("chicken", ("Chickens are calling.", "The calls of chickens.", "Farmyard chickens call."),
               "chickens call in the background", "Chickens.", "chickens", ("chicken", "rooster", "hen", "cluck"),
               train=(GC_FARM + "chickens.ogg", WESNOTH + "ambient/morning.ogg"),
               held_out=("scratch:Animal/Rooster.wav",)),
    SoundClass("duck", ("A duck quacks.", "A duck is quacking.", "Quacking of a duck."),
               "a duck quacks in the background", "A duck.", "a duck quacking", ("duck", "quack"),
               train=(GC_FARM + "duck.ogg",), held_out=("scratch:Animal/Duck.wav",)),
    SoundClass("wolf", ("Sounds of a wolf.", "A wolf is heard.", "A wild wolf calls."),
               "a wolf can be heard in the background", "A wolf.", "a wolf", ("wolf", "wolves", "howl", "growl"),
               train=(WESNOTH + "wolf-growl-*.ogg", "scratch:Animal/WolfHowl.wav"),
               held_out=(WESNOTH + "wolf-growl-4.ogg",)),
    # "chirr", not "chirp": chirp names birds
    SoundClass("cricket", ("Crickets are chirring.", "The sound of crickets.", "Crickets in the grass."),
               "crickets chirr in the background", "Crickets.", "crickets", ("cricket", "insect"),
               train=("scratch:Animal/Crickets.wav",), held_out=("scratch:Animal/Cricket.wav",)),
    # --- people ---
    SoundClass("laugh", ("Someone is laughing.", "A person laughs.", "Laughter."),
               "someone laughs in the background", "A person laughing.", "laughter", ("laugh",),
               # hedgewars' Classic laugh is the Default one; Robot's is synthetic
               train=("scratch:Human/Laugh-male1.wav", "scratch:Human/Laugh-male3.mp3", WESNOTH + "dwarf-laugh.wav")
               + _each(VOICES, *(f"{v}/Laugh.ogg" for v in ("British", "Default", "Default_es", "Default_pl",
                                                           "Default_ru", "Default_uk", "HillBilly", "Mobster",
                                                           "Russian", "Russian_pl"))),
               held_out=("scratch:Human/Laugh-female.wav", "scratch:Human/Laugh-male2.wav",
                         "wesnoth:data/campaigns/World_Conquest/sounds/witches-laugh.wav")
               + _each(VOICES, "Pirate/Laugh.ogg", "Singer/Laugh.ogg", "Surfer/Laugh.ogg")),
    SoundClass("cough", ("Someone is coughing.", "A person coughs.", "Coughing."),
               "someone coughs in the background", "A person coughing.", "coughing", ("cough",),
               # Russian_pl's cough is Default_pl's
               train=("scratch:Human/Cough-female.wav",)
               + _each(VOICES, "Default/PoisonCough.ogg", "Default_es/PoisonCough.ogg", "Default_pl/PoisonCough.ogg"),
               held_out=("scratch:Human/Cough-male.wav", VOICES + "HillBilly/PoisonCough.ogg",
                         VOICES + "Default_ru/PoisonCough.ogg")),
    SoundClass("sneeze", ("Someone sneezes.", "A person sneezes.", "A loud sneeze."),
               "someone sneezes in the background", "A person sneezing.", "a sneeze", ("sneez",),
               train=("scratch:Human/Sneeze-female.wav",), held_out=("scratch:Human/Sneeze-male.wav",)),
    SoundClass("scream", ("Someone screams.", "A person is screaming.", "A scream."),
               "someone screams in the background", "A person screaming.", "a scream", ("scream", "shriek", "yell"),
               train=("scratch:Human/Scream-female.wav", "scratch:Human/Scream-male1.wav")
               + _each(WESNOTH, "human-die-1.ogg", "human-die-2.ogg", "human-female-die-1.ogg",
                       "human-female-die-2.ogg"),
               held_out=("scratch:Human/Scream-male2.mp3", WESNOTH + "human-die-3.ogg",
                         WESNOTH + "human-female-die-3.ogg")),
    SoundClass("footsteps", ("Footsteps.", "Someone is walking.", "Footsteps approach."),
               "footsteps go by in the background", "Someone walking.", "footsteps", ("footstep", "walking", "steps"),
               train=("scratch:Human/Footsteps-1.wav", HEDGEWARS + "steps.ogg", "gcompris:reversecount/icy_walk.wav"),
               held_out=("scratch:Human/Footsteps-2.mp3",)),
    SoundClass("clapping", ("People are clapping.", "Applause.", "Hands clap."),
               "people clap in the background", "People clapping.", "clapping", ("clap", "applau"),
               train=(GC_MEMORY + "LRApplauses_1_LA_cut.ogg",), held_out=("scratch:Percussion/HandClap.wav",)),
    SoundClass("snap", ("Someone snaps their fingers.", "Fingers snap.", "Finger snapping."),
               "someone snaps their fingers in the background", "Fingers snapping.", "finger snapping", ("snap",),
               train=("sonic-pi:perc_snap.flac", "sonic-pi:perc_snap2.flac"),
               held_out=("scratch:Human/FingerSnap.wav",)),
    SoundClass("beatbox", ("Someone is beatboxing.", "A person beatboxes.", "Beatboxing."),
               "someone beatboxes in the background", "A person beatboxing.", "beatboxing", ("beatbox", "beat box"),
               # BeatBox2.wav is BeatBox1.wav again, a little changed
               train=("scratch:Vocals/BeatBox1.wav", "scratch:Music Loops/HumanBeatbox1.mp3"),
               held_out=("scratch:Music Loops/HumanBeatbox2.mp3",)),
    # wordless singing only: Scratch's sung phrases ("Come and play", ...) would teach words as sound
    SoundClass("singing", ("Someone is singing.", "A voice sings.", "Singing."),
               "someone sings in the background", "A person singing.", "singing", ("sing", "choir", "vocal"),
               train=("scratch:Vocals/Singer1.wav", "sonic-pi:ambi_choir.flac", "scratch:Vocals/Oooo-badada.mp3",
                      "scratch:Vocals/Doy-doy-doy.mp3"),
               held_out=("scratch:Vocals/Singer2.wav", "scratch:Vocals/Hey-yay-hey.mp3")),
    # --- vehicles and machines ---
    SoundClass("car", ("A car engine is running.", "A vehicle drives past.", "The engine of a car."),
               "a car drives past in the background", "A car.", "a car engine", ("car", "engine", "motor", "vehicle"),
               train=(GC_MEMORY + "LRStartAndStopCarEngine1LACut.ogg", "gcompris:traffic/car.wav",
                      "scratch:Effects/MotorcyclePassing.wav"),
               held_out=("scratch:Effects/CarPassing.wav",)),
    SoundClass("train", ("A train is passing.", "A train rolls on the tracks.", "The sound of a train."),
               "a train rolls by in the background", "A train.", "a train", ("train", "locomotive", "railway"),
               train=(GC_MEMORY + "LRTrain_slowing_down_01_LA_cut.ogg",),
               held_out=("gcompris:railroad/train.wav",)),
    SoundClass("aircraft", ("An aircraft flies overhead.", "A plane is flying.", "An aircraft is flying past."),
               "an aircraft flies overhead in the background", "An aircraft.", "an aircraft",
               ("plane", "airplane", "aircraft", "helicopter"),
               train=(HEDGEWARS + "plane.ogg", "gcompris:guessnumber/helicopter.wav"),
               held_out=(HEDGEWARS + "rcplane.ogg",)),
    SoundClass("machinery", ("Machinery is running.", "Factory machines are working.", "A machine is running."),
               "machines run in the background", "Machinery.", "machinery", ("machine", "factory", "industrial"),
               train=(GC_MEMORY + "LRFactory_noise_*", "sonic-pi:loop_3d_printer.flac"),
               held_out=(GC_MEMORY + "LRFactory_noise_06_LA.ogg", "scratch:Effects/SewingMachine.mp3")),
    # --- household and everyday ---
    # "door" alone is no keyword: events.py's knock captions say "knocking on a door"
    SoundClass("door", ("A door opens and closes.", "A door creaks open.", "The door closes."),
               "a door opens and closes in the background", "A door opening and closing.", "a door opening",
               ("door open", "door clos", "door creak", "door slam", "creak"),
               # gcompris' canal_lock doors are lock gates, left out
               train=(GC_MEMORY + "LRDoor_Open_2_LA.ogg", "scratch:Effects/DoorCreak.wav", "sonic-pi:perc_door.flac"),
               held_out=("scratch:Effects/DoorClose.mp3",)),
    SoundClass("coins", ("Coins are jingling.", "Coins clink.", "The clink of coins."),
               "coins jingle in the background", "Coins.", "coins", ("coin", "cash", "money"),
               # sonic-pi's perc_till is a cash register's bell more than coins, left out
               train=("gcompris:money/money*.wav",), held_out=(WESNOTH + "gold.ogg",)),
    SoundClass("falling", ("Something falls to the ground.", "An object falls and clatters.", "Something falls over."),
               "something falls in the background", "A falling object.", "something falling",
               ("fall", "thud", "clatter"),
               train=(GC_MEMORY + "LRObject_falling_01_LA.ogg",), held_out=(GC_MEMORY + "LRObject_falling_02_LA.ogg",)),
    # --- water and fire ---
    SoundClass("water", ("Water is running.", "Water flows.", "Running water."),
               "water runs in the background", "Running water.", "running water", ("water", "stream", "flow", "pour"),
               train=("gcompris:canal_lock/water_fill.wav", "gcompris:core/water.wav"),
               held_out=("scratch:Effects/WaterRunning.mp3",)),
    SoundClass("dripping", ("Something is dripping.", "Drops are dripping.", "Dripping."),
               "something drips in the background", "Dripping drops.", "dripping", ("drip", "droplet"),
               train=(HEDGEWARS + "Droplet*.ogg", "gcompris:clickgame/drip.wav"),
               held_out=("scratch:Effects/WaterDrop.mp3", HEDGEWARS + "Droplet3.ogg")),
    SoundClass("splash", ("Something splashes.", "A splash.", "Something lands with a splash."),
               "something splashes in the background", "A splash.", "a splash", ("splash",),
               train=("scratch:Effects/Plunge.wav", "scratch:Effects/Ripples.wav"),
               held_out=(HEDGEWARS + "splash.ogg",)),
    # gcompris' watercycle bubble.wav is clickgame's
    SoundClass("bubbles", ("Bubbles are bubbling.", "Bubbling.", "Air bubbles rise."),
               "bubbles rise in the background", "Bubbles.", "bubbling", ("bubbl",),
               train=("scratch:Effects/Bubbles.wav",), held_out=("gcompris:clickgame/bubble.wav",)),
    SoundClass("fire", ("A fire is burning.", "Flames roar.", "A fire burns and roars."),
               "a fire burns in the background", "A fire.", "a fire burning", ("fire", "flame", "burn", "crackl"),
               train=(WESNOTH + "ambient/campfire.ogg", WESNOTH + "fire.wav", WESNOTH + "flame-big.ogg"),
               held_out=(HEDGEWARS + "flamethrower.ogg",)),
    # --- bangs and weapons ---
    SoundClass("explosion", ("An explosion.", "Something explodes.", "A loud blast."),
               "something explodes in the background", "An explosion.", "an explosion", ("explo", "blast", "boom"),
               train=(HEDGEWARS + "explosion.ogg", "sonic-pi:misc_cineboom.flac"),
               held_out=(WESNOTH + "explosion.ogg",)),
    # no "fire" in the wording: it is the fire class's keyword
    SoundClass("gunshot", ("A gunshot.", "Someone shoots a gun.", "Gunshots ring out."),
               "gunshots ring out in the background", "A gun.", "a gunshot", ("gun",),
               # wesnoth's thunderstick is a musket
               train=(WESNOTH + "gunshot.wav", WESNOTH + "thunderstick.ogg", HEDGEWARS + "minigun.ogg"),
               held_out=(HEDGEWARS + "shotgunfire.ogg",)),
    SoundClass("arrow", ("An arrow is shot from a bow.", "Someone shoots an arrow.", "An arrow flies."),
               "someone shoots arrows in the background", "A bow and arrow.", "an arrow",
               ("arrow", "bow", "crossbow"),
               train=_each(WESNOTH, "bow.ogg", "bow-puny.ogg", "crossbow.ogg"),
               held_out=("gcompris:target/arrow.wav",)),
    SoundClass("whoosh", ("Something whooshes past.", "A swoosh.", "A quick swish through the air."),
               "something whooshes past in the background", "A whoosh.", "a whoosh", ("whoosh", "swoosh", "swish"),
               train=("sonic-pi:perc_swoosh.flac", WESNOTH + "miss-*.ogg", WESNOTH + "dagger-swish.wav"),
               held_out=("sonic-pi:ambi_swoosh.flac", WESNOTH + "miss-3.ogg")),
    # --- instruments (no "music", "melody" or "tune" in their wording: those name events.py's music) ---
    SoundClass("brass", ("A brass instrument is played.", "Someone plays a horn.", "Brass horns sound."),
               "a horn plays in the background", "A brass horn.", "a horn",
               ("trumpet", "horn", "brass", "trombone", "tuba", "fanfare", "bugle"),
               train=_each(GC_INSTRUMENTS, "trumpet.ogg", "trombone.ogg", "tuba.ogg", "horn.ogg")
               + ("scratch:Instruments/Trumpet1.wav", WESNOTH + "horn-signals/horn-*.ogg",
                  WESNOTH + "fanfare-short.wav"),
               held_out=("scratch:Instruments/Trumpet2.wav", WESNOTH + "horn-signals/horn-7.ogg",
                         WESNOTH + "horn-signals/horn-8.ogg")),
    SoundClass("guitar", ("Someone plays the guitar.", "A guitar is played.", "Guitar playing."),
               "a guitar plays in the background", "A guitar.", "a guitar", ("guitar",),
               train=(GC_INSTRUMENTS + "guitar.ogg", GC_INSTRUMENTS + "electric_guitar.ogg", GC_MEMORY + "guitar_*.ogg",
                      "scratch:Instruments/GuitarStrum.wav", "scratch:Music Loops/GuitarChords1.mp3",
                      "sonic-pi:guit_*.flac"),
               held_out=(GC_MEMORY + "guitar_son4.ogg", "scratch:Music Loops/GuitarChords2.mp3",
                         "sonic-pi:guit_harmonics.flac")),
    SoundClass("piano", ("Someone plays the piano.", "A piano is played.", "Piano playing."),
               "a piano plays in the background", "A piano.", "a piano", ("piano",),
               train=(GC_INSTRUMENTS + "piano.ogg",), held_out=("sonic-pi:ambi_piano.flac",)),
    # no "bowed" in the wording: "bow" names the arrow class
    SoundClass("strings", ("A violin is played.", "Someone plays a string instrument.", "Strings are playing."),
               "a violin plays in the background", "A violin.", "a violin", ("violin", "cello", "fiddle", "string"),
               train=(GC_INSTRUMENTS + "violin.ogg", GC_INSTRUMENTS + "cello.ogg",
                      "scratch:Instruments/StringAccent.wav"),
               held_out=("scratch:Instruments/SpookyString.wav",)),
    SoundClass("woodwind", ("A woodwind instrument is played.", "Someone plays a wind instrument.",
                            "A flute or clarinet plays."),
               "a wind instrument plays in the background", "A woodwind instrument.", "a wind instrument",
               ("flute", "clarinet", "sax", "woodwind", "harmonica", "wind instrument", "oboe"),
               train=_each(GC_INSTRUMENTS, "clarinet.ogg", "flute_traversiere.ogg", "harmonica.ogg"),
               held_out=(GC_INSTRUMENTS + "saxophone.ogg",)),
    # sonic-pi's loop_amen is a cut of the same break as loop_amen_full, left out
    SoundClass("drums", ("Someone plays the drums.", "Drums are beating.", "A drum beat."),
               "drums beat in the background", "Drums.", "drums", ("drum",),
               train=_each(GC_INSTRUMENTS, "drum_kit.ogg", "snare_drum.ogg", "bongo.ogg")
               + _each("sonic-pi:", "drum_roll.flac", "drum_snare_*.flac", "drum_tom_*.flac", "drum_bass_*.flac",
                       "drum_heavy_kick.flac", "loop_amen_full.flac", "loop_breakbeat.flac")
               + ("scratch:Music Loops/Drum.mp3", "scratch:Music Loops/DrumSet1.mp3", "scratch:Percussion/DrumBuzz.wav",
                  WESNOTH + "ambient/wardrums.ogg"),
               held_out=(GC_INSTRUMENTS + "timpani.ogg", "scratch:Music Loops/DrumSet2.mp3",
                         "sonic-pi:drum_tom_mid_soft.flac")),
    SoundClass("cymbal", ("A cymbal crashes.", "Someone hits a cymbal.", "Cymbals ring out."),
               "a cymbal crashes in the background", "A cymbal.", "a cymbal", ("cymbal", "hi hat"),
               train=(GC_INSTRUMENTS + "cymbal.ogg", "sonic-pi:drum_cymbal_*.flac", "sonic-pi:drum_splash_*.flac",
                      "scratch:Percussion/RideCymbal.wav"),
               held_out=("scratch:Percussion/CymbalCrash.wav", "sonic-pi:drum_cymbal_soft.flac",
                         "sonic-pi:drum_splash_soft.flac")),
    SoundClass("tabla", ("Someone plays the tabla.", "Tabla beats.", "A tabla is played."),
               "a tabla plays in the background", "A tabla.", "a tabla", ("tabla",),
               train=("sonic-pi:tabla_*.flac",),
               held_out=("sonic-pi:loop_tabla.flac", "sonic-pi:tabla_na_s.flac", "sonic-pi:tabla_ghe8.flac")),
    SoundClass("xylophone", ("Someone plays the xylophone.", "A xylophone is played.", "Xylophone notes."),
               "a xylophone plays in the background", "A xylophone.", "a xylophone", ("xylophone", "marimba"),
               train=("gcompris:melody/xylofon_son*.wav", "scratch:Music Loops/Xylo*.mp3",
                      "scratch:Music Loops/xylo4.mp3"),
               held_out=("gcompris:melody/xylofon_son4.wav", "scratch:Music Loops/Xylo3.mp3")),
    SoundClass("shaker", ("Someone shakes a rattle.", "A shaker rattles.", "Maracas are shaken."),
               "a shaker rattles in the background", "A rattle.", "a rattle",
               ("rattl", "maraca", "shaker", "tambourine"),
               train=(GC_INSTRUMENTS + "maracas.ogg", GC_INSTRUMENTS + "tambourine.ogg", "scratch:Effects/Rattle.wav"),
               held_out=("scratch:Percussion/Shaker.wav",)),
    SoundClass("gong", ("A gong is struck.", "A gong sounds.", "Someone strikes a gong."),
               "a gong sounds in the background", "A gong.", "a gong", ("gong",),
               train=(GC_MEMORY + "LRBuddhist_gong_05_LA.ogg",), held_out=("scratch:Percussion/Gong.wav",)),
    SoundClass("scratching", ("A DJ scratches a record.", "Record scratching.", "A turntable scratch."),
               "a DJ scratches a record in the background", "A turntable.", "record scratching",
               ("scratch", "turntable", "vinyl"),
               train=("sonic-pi:vinyl_scratch.flac", "sonic-pi:vinyl_backspin.flac"),
               held_out=("sonic-pi:vinyl_rewind.flac",)),
    # --- events.py's classes, joined by real recordings ---
    # wesnoth's sounds/bell.wav is a low thud below 110 Hz, no bell, left out
    _joined("bell", train=("sonic-pi:perc_bell*.flac",),
            held_out=("scratch:Effects/BellToll.wav",)),
    _joined("camera", held_out=(HEDGEWARS + "shutterclick.ogg",)),
    _joined("beeping", train=("scratch:Electronic/ComputerBeeps1.wav", "sonic-pi:elec_beep.flac"),
            held_out=("scratch:Electronic/ComputerBeeps2.wav",)),
    _joined("hiss", held_out=("sonic-pi:vinyl_hiss.flac",)),
    _joined("rumble", train=(WESNOTH + "cave-in.ogg",), held_out=(WESNOTH + "rumble.ogg",)),
    _joined("music",
            train=("hedgewars:Music/*.ogg", HEDGEWARS + "ride_of_the_valkyries.ogg",
                   "gcompris:explore_world_music/*.ogg", "gcompris:core/intro.ogg")
            + _each("scratch:Music Loops/", "Cave.mp3", "Eggs.mp3", "Garden.mp3", "Jungle.mp3", "Medieval1.mp3",
                    "Medieval2.mp3", "Techno.mp3", "Techno2.mp3", "HipHop.mp3"),
            held_out=("gcompris:explore_world_music/beethoven.ogg", "gcompris:explore_world_music/japan.ogg",
                      "hedgewars:Music/Rock.ogg", "hedgewars:Music/snow.ogg", "scratch:Music Loops/Triumph.mp3")),
)
SOUND_CLASS_NAMES = tuple(c.name for c in SOUND_CLASSES)
SOUND_CLASSES_BY_NAME = {c.name: c for c in SOUND_CLASSES}
# classes whose only new recording is held out: events.py's renderers train them
HELD_OUT_ONLY = frozenset({"camera", "hiss"})


def missing_packages() -> list[str]:
    return sorted({s.package for s in SOURCES.values() if not s.root.is_dir()})


@lru_cache(maxsize=None)
def _archive(path: str) -> QtResourceArchive:
    return QtResourceArchive(path)


def _expand(spec: str) -> list[tuple[str, str | None]]:
    """The (path, member) pairs a spec names, sorted; none when its package is not installed."""
    key, _, pattern = spec.partition(":")
    source = SOURCES[key]
    if not source.root.is_dir():
        return []
    if source.in_archives:
        archive_name, _, member_glob = pattern.partition("/")
        archive = source.root / f"{archive_name}.rcc"
        members = _archive(str(archive)).names() if archive.is_file() else []
        found = [(str(archive), m) for m in members if fnmatch.fnmatchcase(PurePosixPath(m).name, member_glob)]
    else:
        found = [(str(p), None) for p in sorted(source.root.glob(pattern)) if p.is_file()]
    if not found:
        # the package is there but the file is not: a renamed file must not silently empty a class
        raise LookupError(f"{spec!r} matches no file, although {source.package} is installed")
    return found


def _files(cls: SoundClass, specs: tuple[str, ...], skip: set) -> list[SoundFile]:
    pairs = dict.fromkeys(p for spec in specs for p in _expand(spec) if p not in skip)
    return [SoundFile(cls.name, path, member) for path, member in pairs]


@lru_cache(maxsize=None)
def _split_files() -> dict[str, tuple[tuple[SoundFile, ...], tuple[SoundFile, ...]]]:
    out = {}
    for cls in SOUND_CLASSES:
        held = _files(cls, cls.held_out, set())
        train = _files(cls, cls.train, {(f.path, f.member) for f in held})
        if train or held:
            out[cls.name] = (tuple(train), tuple(held))
    return out


def split(held_out: bool) -> dict[str, list[SoundFile]]:
    """Per class, its held-out files (held_out=True) or its training files; classes whose package is
    missing are absent, and a class may have none on one side (`HELD_OUT_ONLY`)."""
    return {name: list(sides[1] if held_out else sides[0]) for name, sides in _split_files().items()}


def library() -> dict[str, list[SoundFile]]:
    """Per class, all its files: the training ones, then the held-out ones."""
    return {name: list(train + held) for name, (train, held) in _split_files().items()}


def _open(sound: SoundFile):
    return io.BytesIO(_archive(sound.path).read(sound.member)) if sound.member else sound.path


def load(sound: SoundFile, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The recording as mono float64 at `sample_rate`, at its own level, without DC offset."""
    data, rate = soundfile.read(_open(sound), dtype="float64", always_2d=True)
    # the channels' mean, not channel 0: stereo ambiences and music pan sources to one side
    wave = data.mean(axis=1)
    # some recordings sit off zero (gcompris' dog.ogg by 0.05), which would skew their level in a mix
    wave -= wave.mean()
    return np.ascontiguousarray(resample(wave, rate, sample_rate), dtype=np.float64)


def seconds(sound: SoundFile) -> float:
    info = soundfile.info(_open(sound))
    if info.format != "MP3":
        return info.duration
    # libsndfile guesses an MP3's length from its first frame's bitrate: Scratch's Cat.mp3 "lasts"
    # 1.0 s but decodes to 0.5 s
    frames = soundfile.read(_open(sound), dtype="float32", always_2d=True)[0]
    return len(frames) / info.samplerate


# --- command line ------------------------------------------------------------------------------------

def _print_table() -> None:
    train, held = split(held_out=False), split(held_out=True)
    print(f"{'class':<12} {'train':>6} {'s':>8} {'held out':>9} {'s':>7}")
    totals = [0, 0.0, 0, 0.0]
    for name in train:
        row = (len(train[name]), sum(map(seconds, train[name])), len(held[name]), sum(map(seconds, held[name])))
        totals = [t + r for t, r in zip(totals, row)]
        print(f"{name:<12} {row[0]:>6} {row[1]:>8.1f} {row[2]:>9} {row[3]:>7.1f}")
    print(f"{'total':<12} {totals[0]:>6} {totals[1]:>8.1f} {totals[2]:>9} {totals[3]:>7.1f}   ({len(train)} classes)")


def _extract(out: Path) -> None:
    for side, files in (("train", split(held_out=False)), ("held_out", split(held_out=True))):
        for name, sounds in files.items():
            for sound in sounds:
                target = out / side / name / (sound.name.replace("/", "_").rsplit(".", 1)[0] + ".wav")
                target.parent.mkdir(parents=True, exist_ok=True)
                wave = load(sound)
                peak = np.abs(wave).max()
                soundfile.write(target, wave / peak * 0.9 if peak > 0.9 else wave, SAMPLE_RATE, subtype="PCM_16")
    print(f"wrote the library as 16 kHz WAV under {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.sound_library", description=__doc__.splitlines()[0])
    parser.add_argument("--extract", type=Path, metavar="DIR",
                        help="also write every file as 16 kHz mono WAV under DIR/{train,held_out}/CLASS/")
    args = parser.parse_args(argv)
    missing = missing_packages()
    if missing:
        print("missing packages (their files are left out): " + " ".join(missing), file=sys.stderr)
    _print_table()
    if args.extract:
        _extract(args.extract)
    return 0


if __name__ == "__main__":
    sys.exit(main())
