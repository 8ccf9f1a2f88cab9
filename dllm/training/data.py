"""Training data for the voice turn, generated from a seed.

Three kinds of row, each {"raw", "cleaned", "reply", "knowledge", "history"}:

  - cleanup pairs: a clean sentence from a template with slots (names,
    places, foods, times, ... plus a few thousand plain words taken from the
    base model's vocabulary, so content words are copied rather than learnt)
    and its raw version as a recogniser writes it: lower case, no
    punctuation, numbers in words, fillers, repeated words, false starts,
    self-corrections whose retracted part the clean side drops, and now and
    then a near-miss word. Rows from `scripts/asr_roundtrip.py` (clean
    sentences spoken by piper and espeak-ng, transcribed by Whisper) are
    added when their file exists; a fifth of their sentences, every voice
    of each, is kept back as the held-out spoken set;
  - grounded replies (`cards`): a generated knowledge card and a question
    about it; the reply states the card's fact with numbers as words, or
    says it does not know when the card is silent;
  - conversational replies (`talk`): small talk, identity, abilities,
    requests it cannot carry out, factual questions with no card (an honest
    "I don't know"), "say that again" (the last reply, from the history).

Card and conversational rows carry zero to two earlier turns as history.

The held-out split uses templates and slot values that training never sees.

    python -m dllm.training.data --out data/ --seed 0
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
import zlib
from pathlib import Path

# ----------------------------------------------------------------- numbers

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 10000 ("twenty one", "three hundred five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


# ----------------------------------------------------------------- vocabularies

def _words(s: str) -> list[str]:
    return [w.strip() for w in s.split(",") if w.strip()]


NAMES = _words("""Alice, Aaron, Abigail, Adam, Adrian, Aisha, Alan, Albert, Alex, Amelia, Amir, Andrea, Angela,
Anna, Anthony, Arjun, Ava, Barbara, Ben, Bianca, Brandon, Brian, Caleb, Carla, Carlos, Caroline, Chen, Chloe,
Chris, Claire, Daniel, Diana, Diego, Dylan, Elena, Eli, Elijah, Emily, Emma, Eric, Ethan, Fatima, Felix, Fiona,
Frank, Gabriel, Grace, Greg, Hannah, Harry, Hassan, Helen, Henry, Hugo, Ian, Isaac, Isabel, Ivan, Jack, Jacob,
James, Jasmine, Jason, Jenny, Jessica, Joel, John, Jordan, Jose, Julia, Justin, Karen, Kate, Kevin, Kim, Laura,
Leo, Liam, Linda, Lucas, Lucy, Luis, Maria, Mark, Marta, Matt, Maya, Megan, Mia, Michael, Mohammed, Nadia, Naomi,
Nathan, Nina, Noah, Olga, Oliver, Omar, Oscar, Pablo, Paul, Peter, Priya, Rachel, Rahul, Raj, Rebecca, Ricardo,
Rosa, Ruby, Ryan, Samuel, Sara, Sean, Simon, Sofia, Sophie, Steve, Susan, Tara, Theo, Thomas, Tina, Tom, Tyler,
Victor, Vera, Walter, Wendy, Will, Yara, Yusuf, Zach, Zoe, Bruno, Camila, Dmitri, Elsa, Farah, Gustavo, Hiro,
Ingrid, Jonas, Kenji, Lena, Malik, Nora, Pedro, Quinn, Rosa, Sanjay, Tomas, Uma, Wei, Ximena, Yuki""")
CITIES = _words("""Atlanta, Austin, Amsterdam, Athens, Auckland, Bangkok, Barcelona, Berlin, Bogota, Brussels,
Budapest, Buenos Aires, Cairo, Calgary, Chicago, Cleveland, Copenhagen, Dallas, Delhi, Denver, Detroit, Dublin,
Edinburgh, Frankfurt, Geneva, Glasgow, Hamburg, Helsinki, Honolulu, Houston, Istanbul, Jakarta, Kyoto, Lagos,
Lima, Lisbon, Liverpool, London, Madrid, Manchester, Melbourne, Memphis, Miami, Milan, Minneapolis, Montreal,
Mumbai, Munich, Nairobi, Nashville, Oslo, Ottawa, Paris, Perth, Philadelphia, Phoenix, Pittsburgh, Portland,
Prague, Quebec, Rome, Salt Lake City, San Diego, Santiago, Seattle, Seoul, Shanghai, Singapore, Stockholm,
Sydney, Taipei, Tampa, Tokyo, Toronto, Vancouver, Vienna, Warsaw, Zurich, Orlando, Sacramento, Raleigh,
Richmond, Tucson, Omaha, Anchorage, Halifax, Marseille, Naples, Porto, Valencia, Krakow, Osaka, Manila""")
FOODS = _words("""pizza, pasta, salad, soup, sandwich, burger, tacos, sushi, noodles, rice, curry, pancakes,
waffles, omelette, bagel, croissant, muffin, cookies, brownies, cheesecake, ice cream, yogurt, oatmeal, cereal,
chicken, steak, salmon, shrimp, tofu, beans, lentils, potatoes, fries, broccoli, carrots, spinach, mushrooms,
onions, peppers, tomatoes, cucumbers, avocado, apples, bananas, oranges, grapes, strawberries, blueberries,
mango, pineapple, peaches, cherries, lemons, garlic, cheese, butter, bread, tortillas, dumplings, ramen,
lasagna, risotto, burrito, falafel, hummus, kebab, meatballs, chili, stew, popcorn, pretzels, chips, nachos,
donuts, pie, cake, smoothie, milkshake, lemonade, coffee, tea, hot chocolate, orange juice, sparkling water""")
THINGS = _words("""umbrella, backpack, laptop, phone charger, wallet, keys, passport, jacket, sunglasses, notebook,
headphones, water bottle, camera, tablet, scarf, gloves, boots, sneakers, suitcase, printer, stapler, lamp,
blanket, pillow, towel, toothbrush, hairdryer, kettle, toaster, blender, microwave, vacuum, ladder, hammer,
screwdriver, flashlight, batteries, light bulb, extension cord, bicycle, helmet, skateboard, guitar, piano,
violin, football, tennis racket, yoga mat, calendar, envelope, stamps, tape, scissors, glue, markers, pencils,
paint, brushes, vase, mirror, rug, curtains, shelf, desk, chair, sofa, mattress, fan, heater, thermostat, router,
keyboard, mouse, monitor, speaker, remote, watch, ring, necklace, bracelet, tie, belt, hat, coat, raincoat""")
PLACES = _words("""the library, the train station, the bus stop, the airport, the hospital, the pharmacy, the
post office, the bank, the museum, the park, the beach, the gym, the supermarket, the bakery, the cinema, the
city hall, the police station, the fire station, the school, the university, the stadium, the zoo, the
aquarium, the hotel, the restaurant, the cafe, the mall, the parking lot, the gas station, the dentist, the
clinic, the market, the harbor, the bridge, the church, the town square, the office, the warehouse, the
playground, the swimming pool, the bookstore, the hardware store, the laundromat, the garden, the concert hall,
the theater, the ferry terminal, the subway, the visitor center, the front desk, the lobby, the cafeteria""")
DAYS = _words("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday")
MONTHS = _words("January, February, March, April, May, June, July, August, September, October, November, December")
COLORS = _words("red, blue, green, yellow, black, white, purple, orange, pink, gray, brown, silver, gold, navy")
ACTIVITIES = _words("""go swimming, go hiking, play tennis, watch a movie, cook dinner, clean the kitchen, walk
the dog, call my mother, pay the rent, water the plants, do the laundry, take out the trash, go shopping, read a
book, study for the exam, fix the sink, wash the car, visit my grandparents, go for a run, practice the piano,
book a table, pick up the kids, renew my license, drop off the package, charge the car, meet the landlord""")
JOBS = _words("""plumber, electrician, doctor, dentist, nurse, teacher, mechanic, lawyer, accountant, barber,
baker, chef, driver, pilot, manager, engineer, designer, librarian, cashier, receptionist, vet, tutor""")
STREETS = _words("""Elm, Cedar, Willow, Birch, Chestnut, Walnut, Hickory, Spruce, Magnolia, Juniper, Poplar,
Sycamore, Laurel, Aspen, Hawthorn, Linden, Mulberry, Hazel, Cypress, Alder, Rowan, Beacon, Harbor, Mill, Church,
Bridge, Station, Market, Park, Lake, River, Hill, Forest, Meadow, Orchard, Garden, Sunset, Highland""")
RELATIVES = _words("mom, dad, sister, brother, aunt, uncle, cousin, grandmother, grandfather, boss, neighbor, friend, roommate, wife, husband, son, daughter")
# Words a recogniser confuses (wrong spelling, right spelling).
NEAR_MISS = {"weather": "whether", "write": "right", "buy": "by", "here": "hear", "week": "weak",
             "flour": "flower", "meet": "meat", "mail": "male", "sale": "sail", "pair": "pear",
             "whole": "hole", "piece": "peace", "their": "there", "too": "two", "wait": "weight",
             "new": "knew", "hour": "our", "break": "brake", "plane": "plain", "tail": "tale"}


def vocab_words(path: str | Path | None = None, limit: int = 6000) -> list[str]:
    """Plain lower-case words from the base model's vocabulary (single BPE tokens with a space)."""
    from gguf import GGUFReader

    from ..gguf_loader import packaged_smollm2_path
    reader = GGUFReader(str(path or packaged_smollm2_path()))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    words = sorted({t[1:] for t in tokens if re.fullmatch(r"\u0120[a-z]{4,11}", t)})
    stop = set("that this with from have were what when where which there their about would could should "
               "they them then than these those been being into your just also some more most such very".split())
    return [w for w in words if w not in stop][:limit]


# ----------------------------------------------------------------- slots

def _time_words(rng: random.Random) -> str:
    h = rng.randint(1, 12)
    form = rng.random()
    if form < 0.35:
        return f"{number_words(h)} o'clock"
    if form < 0.6:
        return f"{number_words(h)} {rng.choice(['am', 'pm'])}"
    if form < 0.85:
        m = rng.choice([15, 30, 45, 10, 20, 40, 50])
        return f"{number_words(h)} {number_words(m)}"
    return rng.choice(["noon", "midnight", f"half past {number_words(h)}", f"quarter to {number_words(h)}"])


def _ordinal(n: int) -> str:
    special = {1: "first", 2: "second", 3: "third", 5: "fifth", 8: "eighth", 9: "ninth", 12: "twelfth",
               20: "twentieth", 30: "thirtieth"}
    if n in special:
        return special[n]
    if n > 20 and n % 10:
        return _TENS[n // 10] + " " + _ordinal(n % 10)
    return number_words(n) + "th"


class Slots:
    """Slot values, split into a training part and a held-out part."""

    LISTS = {"name": NAMES, "city": CITIES, "food": FOODS, "thing": THINGS, "place": PLACES,
             "color": COLORS, "activity": ACTIVITIES, "job": JOBS, "street": STREETS, "relative": RELATIVES}

    def __init__(self, words: list[str], heldout: bool):
        self.heldout = heldout
        self.lists = {}
        for key, values in {**self.LISTS, "word": words}.items():
            # Every tenth value is held out (by position in the sorted list, so it is stable).
            values = sorted(set(values))
            keep = [v for i, v in enumerate(values) if (i % 10 == 7) == heldout]
            self.lists[key] = keep or values
        self.lists["day"], self.lists["month"] = DAYS, MONTHS

    def value(self, kind: str, rng: random.Random) -> str:
        if kind in self.lists:
            if kind == "thing" and rng.random() < 0.35:  # plain words from the vocabulary: copy, don't memorise
                return rng.choice(self.lists["word"])
            return rng.choice(self.lists[kind])
        if kind == "time":
            return _time_words(rng)
        if kind == "num":
            return number_words(rng.choice([rng.randint(2, 12), rng.randint(2, 30), rng.randint(10, 99)]))
        if kind == "price":
            return f"{number_words(rng.randint(2, 250))} dollars"
        if kind == "digits":  # codes spoken digit by digit
            return " ".join(number_words(int(c)) for c in str(rng.randint(100, 99999)))
        if kind == "date":
            return f"{rng.choice(MONTHS)} {_ordinal(rng.randint(1, 30))}"
        if kind == "floor":
            return _ordinal(rng.randint(1, 12))
        raise KeyError(kind)


# ----------------------------------------------------------------- templates

# Clean sentences with {slot} markers. Questions, requests, statements, complaints.
TEMPLATES = [line.strip() for line in """
What time does {place} open on {day}?
What time does {place} close tonight?
How do I get to {place} from here?
Is {place} open on {day}?
How far is {city} from here?
I need a ticket to {city} on {day}.
Book me a flight to {city} for {date}.
Can you find a hotel in {city} for {num} nights?
What's the weather like in {city} tomorrow?
Will it rain in {city} this weekend?
Set an alarm for {time}.
Wake me up at {time} tomorrow.
Remind me to {activity} at {time}.
Remind me to buy {food} on the way home.
Add {food} to my shopping list.
Add {thing} to the list, please.
Please call {name} at {time}.
Call my {relative} and tell her I'm running late.
Send a message to {name} saying I'll be there at {time}.
Text {name} that the meeting moved to {day}.
Schedule a meeting with {name} on {day} at {time}.
Cancel my appointment with the {job} on {day}.
I have an appointment with the {job} at {time}.
Can you move my {job} appointment to {date}?
I'd like to order {food} with extra {food}.
Can I get a large {food} and a small {food}?
I'll have the {food}, please.
Do you have any {food} left?
How much does the {thing} cost?
I want to return this {thing}.
My {thing} is broken and I need a new one.
I lost my {thing} somewhere near {place}.
Have you seen my {thing}?
Where did I put my {thing}?
The {thing} in the {color} box belongs to {name}.
Can you help me find a {color} {thing}?
I'm looking for a {thing} for my {relative}.
Please turn the lights off in the living room.
Turn the music down a little.
Turn up the heat to {num} degrees.
Play some music by {name}.
How many {food} do we need for {num} people?
We need {num} chairs for the party on {day}.
The party starts at {time} on {day}.
My flight to {city} leaves at {time}.
The train to {city} is delayed by {num} minutes.
Which platform does the train to {city} leave from?
Is there a bus to {place} after {time}?
How long does it take to walk to {place}?
I'm meeting {name} at {place} at {time}.
Tell {name} I'll meet her at {place}.
{name} is picking me up at {time}.
My {relative} is coming to visit in {month}.
We're going to {city} in {month}.
My birthday is on {date}.
The rent is due on {date}.
The package should arrive on {day}.
I ordered a {thing} last week and it still hasn't arrived.
The {thing} I bought yesterday doesn't work.
The {thing} in my room is making a weird noise.
The wifi in {place} is really slow today.
I've been waiting for {num} minutes and nobody has helped me.
This is the third time my order has been wrong.
The {food} was cold when it arrived.
I was charged {price} but the price said less.
Can I pay with a credit card?
Can I pay in cash?
Do you deliver to {street} Street?
My address is {digits} {street} Avenue.
I live on {street} Road near {place}.
The office is on the {floor} floor.
My room number is {digits}.
My order number is {digits}.
The code for the door is {digits}.
I need to speak with the manager.
Can you help me with my account?
I forgot my password and I can't log in.
How do I reset my password?
What's the best way to get to {city}?
What's a good place to eat near {place}?
Where can I buy {food} around here?
Where is the nearest {job}?
Is there a {job} open on {day}?
Do I need a reservation for {num} people?
I'd like a table for {num} at {time}.
Can we sit outside?
How late is the kitchen open?
I think I left my {thing} at {place}.
Could you check if {name} is in the office?
{name} said the meeting is at {time}.
I can't make it on {day}, how about {day}?
Let's meet on {day} instead.
I'll be there in {num} minutes.
I'm running about {num} minutes late.
What's on my calendar for {day}?
Do I have anything planned on {date}?
How many days until {date}?
What's the date on {day}?
What time is it in {city} right now?
Convert {price} to euros.
What is {num} times {num}?
How do you spell {word}?
What does the word {word} mean?
Write down the word {word}.
Make a note that {name} likes {food}.
Save a note called {word} for later.
Start a timer for {num} minutes.
Stop the timer.
How much time is left on the timer?
Read me the news.
Tell me a joke.
What's the capital of {city}'s country?
I'd like to book a room for {num} nights starting {date}.
Is breakfast included with the room?
What time is checkout?
Can I get a late checkout on {day}?
The shower in my room doesn't have hot water.
There's no {thing} in my room.
Could you send up some extra towels?
Please bring a {thing} to room {digits}.
I'd like to rent a {thing} for the day.
Where can I park my car?
How much is parking for {num} hours?
Does this bus stop at {place}?
I missed my stop, where do I get off for {place}?
Can you recommend a {job} in {city}?
I need a {job} to come fix the {thing}.
My {relative} wants to learn how to {activity}.
I want to {activity} after work.
I usually {activity} on {day}.
Let's {activity} this weekend.
Don't forget to {activity} tomorrow.
I'm allergic to {food}.
Does the {food} have nuts in it?
Is the {food} vegetarian?
I'd like the {food} without {food}.
Hi, can you tell me where {place} is?
Excuse me, is this the way to {place}?
Thanks, and how do I get back to {place}?
Sorry, could you repeat that?
Yes, please book it for {time}.
No, I said {city}, not {city}.
I think the {thing} in the hallway is broken.
The {thing} on the {floor} floor stopped working again.
We need {num} more {thing} in room {digits}.
Could we get {num} extra pillows in room {digits}?
Is there any {food} left in the kitchen?
I really enjoyed the {food} at {place} yesterday.
We had a great time in {city} last summer.
Can you put on some music for the party?
Is it okay if I bring my {relative} along?
Would it be possible to change my seat?
I was wondering if {place} is open late on {day}.
Do you happen to know when {place} closes?
Any idea how long the line is at {place}?
My {relative} and I are looking for {place}.
I need to pick up my {thing} from {place} before {time}.
Could you tell me how to get to {street} Street?
Is {place} far from {street} Avenue?
How long will the repairs on the {thing} take?
I'd like to speak to someone about my bill.
There's a problem with my order, it's missing the {food}.
The {thing} I ordered came in the wrong color.
Can I change my delivery to {day}?
How much would it cost to ship a {thing} to {city}?
I'd like to cancel my subscription.
My card was declined, can I try another one?
Please send the receipt to my email.
Where do I sign up for the {word} class?
Is the {word} class full on {day}?
Does the {job} work on weekends?
I need a {job} as soon as possible, my {thing} is leaking.
How often does the bus to {place} run?
Is the {place} within walking distance?
What's the quickest way to {city} from the airport?
Can you recommend something to do in {city} on a rainy day?
I'm not feeling well, where is the nearest pharmacy?
My {relative} lost a {color} {thing} near the entrance.
Has anyone turned in a {color} {thing}?
How many tickets are left for {day}?
Are there any seats available at {time}?
I'd like two tickets for the show at {time}, please.
Can kids come to the {word} event?
What should I bring to the {word} workshop?
Please let {name} know that I called.
Tell {name} the {thing} is ready for pickup.
Can you check whether my {thing} has been shipped?
I just moved to {street} Road and need to update my address.
""".strip().splitlines()]

GREETINGS = ["Hi", "Hello", "Hey", "Excuse me", "Okay", "Thanks"]


def is_heldout_template(i: int) -> bool:
    return i % 7 == 3


def render(template: str, slots: Slots, rng: random.Random) -> list[tuple[str, str | None, str]]:
    """Pieces of a clean sentence: (text, slot kind or None, slot value)."""
    pieces = []
    for part in re.split(r"(\{[a-z]+\})", template):
        if not part:
            continue
        if part.startswith("{"):
            kind = part[1:-1]
            value = slots.value(kind, rng)
            pieces.append((value, kind, value))
        else:
            pieces.append((part, None, ""))
    return pieces


def clean_text(pieces: list[tuple[str, str | None, str]]) -> str:
    s = "".join(p[0] for p in pieces)
    return s[0].upper() + s[1:]


def raw_words(text: str) -> list[str]:
    """A recogniser's spelling of `text`: lower case, no punctuation but apostrophes."""
    text = text.lower().replace("-", " ")
    return re.sub(r"[^a-z0-9' ]+", " ", text).split()


# ----------------------------------------------------------------- corruption

FILLERS_START = ["um", "uh", "so", "well", "okay so", "like", "you know", "so um", "hmm", "uh so", "um so",
                 "oh", "er", "alright so", "okay um"]
FILLERS_MID = ["um", "uh", "like", "you know", "i mean", "er", "uh like", "um like", "sort of", "hmm"]
CORRECTIONS = ["no sorry", "sorry", "i mean", "no wait", "actually", "uh no", "no no", "or rather", "wait no",
               "sorry i mean", "um no", "no i mean", "oops", "let me rephrase"]


def corrupt(pieces: list[tuple[str, str | None, str]], slots: Slots, rng: random.Random,
            other_words: list[str]) -> str:
    """The raw transcript for the clean `pieces`: disfluencies added, meaning kept."""
    # Words, each tagged with the index of its slot piece (or -1).
    words: list[tuple[str, int]] = []
    for i, (text, kind, _) in enumerate(pieces):
        words += [(w, i if kind else -1) for w in raw_words(text)]
    out = [w for w, _ in words]
    # A self-correction of one slot: "to paris no sorry to rome".
    slot_ids = sorted({i for _, i in words if i >= 0})
    if slot_ids and rng.random() < 0.3:
        i = rng.choice(slot_ids)
        kind = pieces[i][1]
        wrong = pieces[i][2]
        for _ in range(5):
            wrong = slots.value(kind, rng)
            if wrong != pieces[i][2]:
                break
        start = next(k for k, (_, j) in enumerate(words) if j == i)
        again = [out[start - 1]] if start > 0 and rng.random() < 0.5 else []
        out = out[:start] + raw_words(wrong) + rng.choice(CORRECTIONS).split() + again + out[start:]
    # Near-miss spelling.
    if rng.random() < 0.06:
        for k, w in enumerate(out):
            if w in NEAR_MISS:
                out[k] = NEAR_MISS[w]
                break
    # A repeated word or phrase, sometimes with a filler between: "the the", "how do i uh how do i".
    n_rep = rng.choice([0, 0, 1, 1, 1, 2])
    for _ in range(n_rep):
        k = rng.randrange(len(out))
        span = rng.choice([1, 1, 1, 2, 2, 3])
        gap = rng.choice([[], [], [], ["uh"], ["um"], ["i mean"]])
        gap = [w for g in gap for w in g.split()]
        out = out[:k + span] + gap + out[k:k + span] + out[k + span:]
    # A restart: the opening words said again after a pause.
    if rng.random() < 0.1 and len(out) > 4:
        n = rng.randint(2, 3)
        out = out[:n] + rng.choice([[], ["uh"], ["um"]]) + out
    # Fillers inside.
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        k = rng.randrange(1, max(2, len(out)))
        out = out[:k] + rng.choice(FILLERS_MID).split() + out[k:]
    # A false start: the opening of another sentence, abandoned.
    if rng.random() < 0.12 and other_words:
        out = other_words[:rng.randint(1, 3)] + rng.choice([[], ["uh"], ["um"], ["sorry"]]) + out
    if rng.random() < 0.45:
        out = rng.choice(FILLERS_START).split() + out
    if rng.random() < 0.05:
        out = out + rng.choice(["you know", "um", "i guess", "or something"]).split()
    return " ".join(out)


def cleanup_row(template: str, slots: Slots, rng: random.Random, other: str, *, second: str | None = None) -> dict:
    """A (raw, cleaned) pair from `template`; with `second`, a longer turn of two sentences."""
    pieces = render(template, slots, rng)
    if rng.random() < 0.08 and not template.startswith(tuple(GREETINGS)):
        g = rng.choice(GREETINGS)
        pieces = [(g + ", " + pieces[0][0][0].lower() + pieces[0][0][1:], pieces[0][1], pieces[0][2])] + pieces[1:] \
            if pieces[0][1] is None else [(g + ", ", None, "")] + pieces
    if second is not None:
        more = render(second, slots, rng)
        more[0] = (more[0][0][0].upper() + more[0][0][1:],) + more[0][1:]
        pieces = pieces + [(" ", None, "")] + more
    clean = clean_text(pieces)
    raw = " ".join(raw_words(clean)) if rng.random() < 0.08 else corrupt(pieces, slots, rng, raw_words(other))
    return {"raw": raw, "cleaned": clean, "reply": None, "knowledge": None, "history": []}


# ----------------------------------------------------------------- assembly

def with_history(rng: random.Random, pool: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Zero to two earlier (user, assistant) turns drawn from `pool`."""
    n = rng.choice([0, 0, 0, 1, 1, 2])
    return tuple(rng.choice(pool) for _ in range(n)) if pool else ()


def generate(seed: int, *, n_cleanup: int, n_grounded: int, n_talk: int, heldout: bool,
             words: list[str]) -> list[dict]:
    """Rows of every kind, reproducible from `seed`; `heldout` draws the reserved templates and values."""
    from .cards import card_turn
    from .talk import talk_turn
    rng = random.Random(seed)
    slots = Slots(words, heldout)
    templates = [t for i, t in enumerate(TEMPLATES) if is_heldout_template(i) == heldout]
    rows = []
    for _ in range(n_cleanup):
        rows.append(cleanup_row(rng.choice(templates), slots, rng, rng.choice(TEMPLATES).split("{")[0],
                                second=rng.choice(templates) if rng.random() < 0.12 else None))
    past: list[tuple[str, str]] = []  # earlier turns, for history
    for i in range(n_grounded + n_talk):
        history = with_history(rng, past)
        if i < n_grounded:
            card, question, reply, accept = card_turn(rng, heldout)
        else:
            card = None
            question, reply, accept = talk_turn(rng, slots, heldout, history)
        past.append((question, reply))
        past = past[-50:]
        raw = corrupt([(question, None, "")], slots, rng, []) if rng.random() < 0.7 else " ".join(raw_words(question))
        row = {"raw": raw, "cleaned": question, "reply": reply, "knowledge": card, "history": [list(h) for h in history]}
        if accept:
            row["accept"] = accept
        rows.append(row)
    return rows


def is_heldout_spoken(row: dict) -> bool:
    """A fifth of the round-trip rows' clean sentences, with every voice that spoke them, are held out: the
    spoken set measures how the model copes with what Whisper writes, on sentences it never trained on."""
    return zlib.crc32(row["cleaned"].lower().encode()) % 5 == 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dllm.training.data", description="Generate the voice-turn training data.")
    p.add_argument("--out", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cleanup", type=int, default=40000, help="templated cleanup pairs (train)")
    p.add_argument("--grounded", type=int, default=30000, help="knowledge-card turns (train)")
    p.add_argument("--talk", type=int, default=20000, help="conversational turns with no card (train)")
    p.add_argument("--heldout-cleanup", type=int, default=300)
    p.add_argument("--heldout-grounded", type=int, default=150)
    p.add_argument("--heldout-talk", type=int, default=100)
    p.add_argument("--asr-roundtrip", metavar="FILE", help="rows of scripts/asr_roundtrip.py to add to the training "
                   "rows (default: OUT/asr_roundtrip.jsonl, if there)")
    p.add_argument("--asr-repeat", type=int, default=1,
                   help="each training round-trip row this many times (a fine-tune on speech-made text)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    words = vocab_words()
    print(f"{len(words)} vocabulary words; {len(TEMPLATES)} templates", flush=True)
    train = generate(args.seed, n_cleanup=args.cleanup, n_grounded=args.grounded, n_talk=args.talk,
                     heldout=False, words=words)
    held = generate(args.seed + 1000, n_cleanup=args.heldout_cleanup, n_grounded=args.heldout_grounded,
                    n_talk=args.heldout_talk, heldout=True, words=words)
    print(f"generated: {len(train)} train rows, {len(held)} held-out rows ({time.perf_counter() - t0:.1f} s)", flush=True)
    asr = Path(args.asr_roundtrip) if args.asr_roundtrip else out / "asr_roundtrip.jsonl"
    if args.asr_roundtrip and not asr.is_file():
        raise SystemExit(f"--asr-roundtrip {asr}: no such file (make it with scripts/asr_roundtrip.py)")
    if asr.is_file():
        rows = [r for r in map(json.loads, asr.open()) if r["raw"].strip()]  # Whisper heard nothing: no row
        spoken = [r for r in rows if is_heldout_spoken(r)]
        rows = [r for r in rows if not is_heldout_spoken(r)]
        train += rows * args.asr_repeat
        with open(out / "heldout_spoken.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in spoken)
        print(f"added {len(rows)} speech round-trip rows from {asr} ({args.asr_repeat}x); "
              f"wrote {out / 'heldout_spoken.jsonl'}: {len(spoken)} rows", flush=True)
    else:
        print(f"no {asr}: run `python scripts/asr_roundtrip.py --out {out}` for speech-made raw text", flush=True)
    random.Random(args.seed).shuffle(train)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {out / name}: {len(rows)} rows", flush=True)


if __name__ == "__main__":
    main()
