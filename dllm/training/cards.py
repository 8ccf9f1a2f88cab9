"""Knowledge-card turns: a venue's facts, a visitor's question, the answer.

A card is a venue's name and a few short facts written the way people write
notices (digits, abbreviations, fragments: "Towels at the front desk.",
"Films at 4, 7 and 9:30 pm."). The reply states the asked fact in a full
spoken sentence with numbers as words ("nine thirty pm"), because number
words are single tokens that a few-step denoiser fills consistently, and
piper reads them as written. Questions about facts the card lacks, or that
no card covers, get an honest "I don't know".

Each fact is a dict: "card" (its sentence on the card), "questions",
"replies", "accept" (strings of which one must appear in a right reply).
"""
from __future__ import annotations

import random

from .data import DAYS, NAMES, _words, number_words
from .talk import DONT_KNOW, UNKNOWN_ACCEPT

VENUE_NAMES = _words("""Riverside, Lakeview, Maplewood, Harborview, Pinecrest, Sunnyvale, Cedar Grove, Willow
Creek, Bayside, Hillcrest, Northgate, Southpoint, Eastwood, Westfield, Brookside, Fairview, Greenfield, Silver
Lake, Golden Gate, Redwood, Stonebridge, Meadowbrook, Ashford, Kingsley, Clearwater, Blue Ridge, Foxhill,
Elmhurst, Rosewood, Ironwood, Copper Hill, Lighthouse, Evergreen, Sandy Shore, Hollow Oak, Bright Star,
Crescent, Summit, Horizon, Parkside, Old Town, Union, Liberty, Central, Highland, Orchard, Marble Arch,
Thornbury, Wexford, Glenwood, Beacon Hill, Misty Valley, Twin Pines, Juniper, Sparrow, Falcon, Polar, Coral,
Main Street, King Street, Harbor Road, Elm Street, Station Road, Market Square, Castle Hill, Rose Lane""")
VENUE_TYPES = _words("""Museum, Library, Zoo, Aquarium, Gym, Pharmacy, Cafe, Bakery, Cinema, Hotel, Swimming
Pool, Art Gallery, Bookstore, Science Center, Garden Center, Bowling Alley, Ice Rink, Climbing Gym, Bike Rental,
Community Center, Dental Clinic, Hair Salon, Pet Shop, Farmers Market, Botanical Garden, Water Park, Theater,
Car Wash, Hostel, Visitor Center, Food Hall, Music School, Yoga Studio, Tennis Club, Laundromat, Post Office,
Medical Center, Spa, Restaurant, Pizzeria, Arcade, Planetarium, Campground, Marina, Train Station, Bank""")
GROUPS = [("adults", "an adult ticket", "Adults"), ("children", "a child ticket", "Children"),
          ("seniors", "a senior ticket", "Seniors"), ("students", "a student ticket", "Students"),
          ("members", "a member ticket", "Members")]
ITEMS = _words("""day pass, locker, guided tour, parking ticket, coffee, sandwich, bike rental, towel rental,
single class, monthly pass, haircut, audio guide, gift wrap, popcorn, shoe rental, kayak rental, hot dog,
bottle of water, map, umbrella rental, car wash, massage, lesson, souvenir mug, tote bag, ice cream, pretzel,
lunch special, breakfast, family pass, season pass, photo print, phone charger rental, sled rental""")
EVENTS = _words("""guided tour, story time, live music, feeding time, yoga class, movie night, trivia night,
cooking class, kids workshop, book club, swim lesson, art class, wine tasting, open mic, lecture, dance class,
penguin feeding, sea lion show, planetarium show, choir practice, chess club, spin class, pilates class,
bingo night, craft fair, puppet show, karaoke night, farmers market, jazz night, meditation class""")
SPOTS = _words("""restrooms, lockers, lost and found, elevator, gift shop, cafe, first aid room, information desk,
coat check, water fountain, exit, changing rooms, ticket office, towels, wheelchairs, strollers, charging
station, prayer room, baby changing room, vending machines, bike racks, luggage storage, printer, sauna,
reception, pool, library corner, picnic area, shuttle stop""")
WHERE = _words("""on the second floor, next to the entrance, by the main stairs, at the back, in the basement,
on the ground floor, behind the front desk, near the elevators, on the third floor, across from the cafe,
at the end of the hall, outside by the garden, upstairs, downstairs, at the front desk, next to the gift shop,
in the lobby, by the north door, at counter two, in room five, near the parking lot, beside the pool""")
SERVICES = _words("""flu shots, haircuts, eye exams, bike repairs, tire changes, passport photos, blood tests,
massages, piano lessons, tours, key cutting, tailoring, phone repairs, tax help, vaccinations""")
AMENITIES = [("Free wifi.", "Is there wifi?", "Yes, there's free wifi.", "free wifi"),
             ("Lockers available.", "Do you have lockers?", "Yes, lockers are available.", "lockers"),
             ("Wheelchair accessible.", "Is it wheelchair accessible?", "Yes, it's wheelchair accessible.", "accessible"),
             ("Free coffee for guests.", "Is there coffee?", "Yes, coffee is free for guests.", "free"),
             ("Sauna on the ground floor.", "Is there a sauna?", "Yes, there's a sauna on the ground floor.", "ground floor"),
             ("Showers in the changing rooms.", "Are there showers?", "Yes, there are showers in the changing rooms.", "changing rooms"),
             ("Gift cards sold at reception.", "Do you sell gift cards?", "Yes, gift cards are sold at reception.", "reception"),
             ("Baby changing room by the exit.", "Is there a baby changing room?", "Yes, it's by the exit.", "exit")]
UNLISTED = ["Is there a sauna?", "Do you sell gift cards?", "Is there a dress code?", "Can I book a birthday party here?",
            "Do you have a phone charger I can borrow?", "Is the water safe to drink?", "Do you offer student discounts?",
            "Can I get a refund?", "Is there a bus stop nearby?", "Are you hiring right now?", "Is there a cash machine here?",
            "Do you have a lost and found?", "Can I bring my bike inside?", "Is there a pool?", "Do you deliver?",
            "Are there lockers?", "Is there wifi?", "Do you have wheelchairs?", "Is smoking allowed?"]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def clock(h: int, m: int = 0, ap: str = "") -> tuple[str, str]:
    """A time as the card writes it and as the reply says it: ("9:30 pm", "nine thirty pm")."""
    digits = f"{h}:{m:02d}" if m else f"{h}"
    words = number_words(h) + (f" {number_words(m)}" if m else "")
    return (f"{digits} {ap}", f"{words} {ap}") if ap else (digits, words)


def money(n: int) -> tuple[str, str]:
    return f"{n} dollars", f"{number_words(n)} dollars"


def _hours(rng: random.Random) -> list[dict]:
    o, c = rng.randint(6, 11), rng.randint(4, 11)
    (od, ow), (cd, cw) = clock(o, 0, "am"), clock(c, 0, "pm")
    days = rng.choice(["daily ", "", "Monday to Friday ", "every day ", "weekdays "])
    card = rng.choice([f"Open {days}{od} to {cd}.", f"Hours {od} to {cd}.", f"Open {days}from {od} until {cd}."])
    facts = [{"card": card,
              "questions": ["What time do you open?", "When do you open?", "What time do you close?", "How late are you open?",
                            "What are your opening hours?", "When do you close today?", "Are you open in the morning?"],
              "replies": [f"We open at {ow} and close at {cw}.", f"We're open from {ow} to {cw}.", f"Our hours are {ow} to {cw}."],
              "accept": [str(o), str(c), number_words(o), number_words(c)]}]
    if rng.random() < 0.4:
        day = rng.choice(["Saturday", "Sunday"])
        so, sc = rng.randint(9, 12), rng.randint(3, 6)
        (sod, sow), (scd, scw) = clock(so, 0, "am"), clock(sc, 0, "pm")
        facts[0]["card"] = card[:-1] + f", {day}s {sod} to {scd}."
        facts.append({"card": "", "questions": [f"When do you open on {day}?", f"What are your hours on {day}?",
                                                f"Are you open on {day}?", f"What time do you close on {day}?"],
                      "replies": [f"On {day}s we're open from {sow} to {scw}.", f"On {day}s we open at {sow} and close at {scw}."],
                      "accept": [str(so), str(sc), number_words(so), number_words(sc)]})
    return facts


def _facts(rng: random.Random) -> list[dict]:
    """Every kind of fact, freshly drawn; the card shows some of them."""
    facts = _hours(rng)
    closed = rng.choice(DAYS)
    facts.append({"card": f"Closed on {closed}s.", "questions": ["Which day are you closed?", "Is there a day you're closed?",
                                                                f"Are you open on {closed}?", "Are you closed any day?"],
                  "replies": [f"We're closed on {closed}s.", f"Sorry, we're closed every {closed}."], "accept": [closed]})
    a, who = rng.randint(8, 40), rng.choice(GROUPS[1:])
    k = rng.randint(2, a - 1)
    facts.append({"card": rng.choice([f"Adults {a} dollars, {who[0]} {k} dollars.", f"Tickets {a} dollars, {who[0]} {k} dollars.",
                                      f"Entry {a} dollars. {who[2]} {k} dollars."]),
                  "questions": [f"How much is {who[1]}?", f"What does {who[1]} cost?", f"How much for {who[0]}?",
                                f"How much do {who[0]} pay?"],
                  "replies": [f"{cap(who[1])} is {money(k)[1]}.", f"It's {money(k)[1]} for {who[0]}."],
                  "accept": [str(k), number_words(k)]})
    facts.append({"card": "", "questions": ["How much is an adult ticket?", "How much is it for an adult?", "How much are tickets?",
                                            "What's the entry fee?"],
                  "replies": [f"An adult ticket is {money(a)[1]}.", f"It's {money(a)[1]} for adults."],
                  "accept": [str(a), number_words(a)]})
    if rng.random() < 0.4:  # a cheaper day
        day, d = rng.choice(DAYS), rng.randint(2, a - 1)
        facts[-2]["card"] += f" {day}s {d} dollars."
        facts.append({"card": "", "questions": [f"How much are tickets on {day}?", f"Is it cheaper on {day}?",
                                                f"What does it cost on a {day}?"],
                      "replies": [f"On {day}s tickets are {money(d)[1]}.", f"It's {money(d)[1]} on {day}s."],
                      "accept": [str(d), number_words(d)]})
    item, p = rng.choice(ITEMS), rng.randint(2, 60)
    facts.append({"card": rng.choice([f"{cap(item)} {p} dollars.", f"{cap(item)}: {p} dollars.", f"{cap(item)} costs {p} dollars."]),
                  "questions": [f"How much is a {item}?", f"What does the {item} cost?", f"How much do you charge for a {item}?",
                                f"What's the price of a {item}?"],
                  "replies": [f"A {item} is {money(p)[1]}.", f"The {item} costs {money(p)[1]}."],
                  "accept": [str(p), number_words(p)]})
    ev, ap = rng.choice(EVENTS), rng.choice(["am", "pm"])
    et, em = rng.randint(1, 11), rng.choice([0, 0, 0, 30])
    (etd, etw) = clock(et, em, ap)
    days = rng.sample(DAYS, rng.choice([1, 1, 2]))
    dcard, dsay = (f"on {days[0]}s", f"on {days[0]}s") if len(days) == 1 else \
        (f"{days[0]} and {days[1]}", f"on {days[0]} and {days[1]}")
    if rng.random() < 0.3:
        dcard = dsay = "daily"
    facts.append({"card": rng.choice([f"{cap(ev)} {dcard} at {etd}.", f"{cap(ev)} at {etd} {dcard}."]),
                  "questions": [f"When is the {ev}?", f"What time is the {ev}?", f"Is there a {ev}?", f"When can I see the {ev}?"],
                  "replies": [f"The {ev} is {dsay} at {etw}.", f"There's a {ev} {dsay} at {etw}."],
                  "accept": [str(et), number_words(et)] + ([] if dcard == "daily" else days)})
    spot, where = rng.choice(SPOTS), rng.choice(WHERE)
    verb = "are" if spot.endswith("s") else "is"
    facts.append({"card": rng.choice([f"{cap(spot)} {where}.", f"{cap(spot)} {verb} {where}."]),
                  "questions": [f"Where {verb} the {spot}?", f"Where can I find the {spot}?", f"How do I get to the {spot}?",
                                f"Do you know where the {spot} {verb}?"],
                  "replies": [f"The {spot} {verb} {where}.", f"You'll find the {spot} {where}."],
                  "accept": [where.split(" ", 1)[-1] if where.count(" ") else where]})
    n, where2 = rng.randint(1, 9), rng.choice(WHERE)
    room = rng.choice(["Screen", "Room", "Gate", "Hall", "Studio", "Court"])
    facts.append({"card": f"{room} {n} is {where2}.",
                  "questions": [f"Where is {room.lower()} {number_words(n)}?", f"How do I find {room.lower()} {number_words(n)}?"],
                  "replies": [f"{room} {number_words(n)} is {where2}."],
                  "accept": [where2.split(" ", 1)[-1] if where2.count(" ") else where2]})
    park = rng.randint(2, 20)
    facts.append(rng.choice([
        {"card": "Parking is free.", "replies": ["Parking is free."], "accept": ["free"]},
        {"card": f"Parking {park} dollars a day.", "replies": [f"Parking is {money(park)[1]} a day."],
         "accept": [str(park), number_words(park)]},
        {"card": "No parking on site.", "replies": ["Sorry, there's no parking on site."], "accept": ["no parking"]}]))
    facts[-1]["questions"] = ["Is there parking?", "Do I have to pay for parking?", "Where can I park?", "How much is parking?"]
    rule = rng.choice([
        ("No pets allowed.", ["Can I bring my cat?", "Are pets allowed?"], "Sorry, pets are not allowed.", "not allowed"),
        ("Dogs welcome on a leash.", ["Can I bring my dog?", "Are dogs allowed?"], "Yes, dogs are welcome on a leash.", "leash"),
        ("No outside food or drinks.", ["Can I bring my own food?", "Can I bring snacks?"], "Sorry, no outside food or drinks.", "no outside"),
        ("Photos allowed without flash.", ["Can I take pictures?", "Are photos allowed?"], "Yes, you can take photos without flash.", "without flash"),
        ("No smoking anywhere on site.", ["Can I smoke here?", "Is smoking allowed?"], "Sorry, smoking is not allowed anywhere on site.", "not allowed"),
    ])
    facts.append({"card": rule[0], "questions": rule[1], "replies": [rule[2]], "accept": [rule[3]]})
    service = rng.choice(SERVICES)
    facts.append(rng.choice([
        {"card": f"{cap(service)} without appointment.", "replies": [f"No, you don't need an appointment for {service}."],
         "accept": ["no", "without"]},
        {"card": f"{cap(service)} by appointment only.", "replies": [f"Yes, {service} are by appointment only."],
         "accept": ["yes", "appointment only"]}]))
    facts[-1]["questions"] = [f"Do I need an appointment for {service}?", f"Can I just walk in for {service}?",
                              f"Do I have to book {service}?"]
    times = sorted(rng.sample(range(1, 11), 3))
    last_m = rng.choice([0, 30])
    shows = [clock(t) for t in times[:-1]] + [clock(times[-1], last_m)]
    what = rng.choice(["Films", "Shows", "Tours", "Boats", "Classes"])
    facts.append({"card": f"{what} at {shows[0][0]}, {shows[1][0]} and {shows[2][0]} pm.",
                  "questions": [f"What time is the last {what[:-1].lower()}?", f"When does the last {what[:-1].lower()} start?"],
                  "replies": [f"The last {what[:-1].lower()} is at {shows[2][1]} pm."],
                  "accept": [shows[2][0], shows[2][1]]})
    facts.append({"card": "", "questions": [f"What time is the first {what[:-1].lower()}?", f"When is the first {what[:-1].lower()}?"],
                  "replies": [f"The first {what[:-1].lower()} is at {shows[0][1]} pm."],
                  "accept": [shows[0][0], shows[0][1]], "needs": len(facts) - 1})
    name = rng.choice(NAMES)
    facts.append({"card": rng.choice([f"Manager today: {name}.", f"Ask for {name} at the front desk."]),
                  "questions": ["Who is the manager today?", "Who can I talk to?", "Who should I ask for help?"],
                  "replies": [f"You can ask for {name}."], "accept": [name]})
    amen = rng.choice(AMENITIES)
    facts.append({"card": amen[0], "questions": [amen[1]], "replies": [amen[2]], "accept": [amen[3]]})
    if rng.random() < 0.5:
        word, code = rng.choice(["sunshine", "welcome", "guest", "visitor", "hello", "coffee", "garden", "summer"]), rng.randint(10, 99)
        facts.append({"card": f"Wifi password {word}{code}.", "questions": ["What's the wifi password?", "How do I get on the wifi?"],
                      "replies": [f"The wifi password is {word}{code}."], "accept": [f"{word}{code}"]})
    return facts


def make_card(rng: random.Random, heldout: bool) -> tuple[str, list[dict]]:
    """A venue card and its facts, each marked "known" (on the card) or not."""
    names = [v for i, v in enumerate(VENUE_NAMES) if (i % 10 == 7) == heldout]
    venue = f"{rng.choice(names)} {rng.choice(VENUE_TYPES)}"
    facts = _facts(rng)
    # Facts with no card sentence of their own ride on the one before them.
    owners = [i if f["card"] else f.get("needs", i - 1) for i, f in enumerate(facts)]
    heads = [i for i, f in enumerate(facts) if f["card"]]
    rng.shuffle(heads)
    shown = set(heads[:rng.randint(3, 6)])
    card = venue + ". " + " ".join(facts[i]["card"] for i in heads if i in shown)
    return card, [dict(f, known=owners[i] in shown) for i, f in enumerate(facts)]


def card_turn(rng: random.Random, heldout: bool) -> tuple[str, str, str, list[str]]:
    """(card, clean question, reply, accept): 70% on the card, the rest unknown to it."""
    card, facts = make_card(rng, heldout)
    known = [f for f in facts if f["known"]]
    unknown = [f for f in facts if not f["known"]]
    r = rng.random()
    if r < 0.7 and known:
        f = rng.choice(known)
        return card, rng.choice(f["questions"]), rng.choice(f["replies"]), f["accept"]
    if r < 0.85 and unknown:
        question = rng.choice(rng.choice(unknown)["questions"])
    else:
        question = rng.choice(UNLISTED)
    words = set(card.lower().replace(".", " ").split())
    if any(w.strip("?") in words for w in question.lower().split() if len(w) > 5):
        question = "Is the water safe to drink?"  # a question the card may partly answer is left out
    return card, question, rng.choice(DONT_KNOW), UNKNOWN_ACCEPT
