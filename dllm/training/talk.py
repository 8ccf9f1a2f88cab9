"""Conversational turns with no knowledge card: small talk, identity, limits.

Each intent has many ways a person says it and a few short replies a voice
assistant should give. Requests it cannot carry out get an honest "I can't",
and factual questions with no card get an honest "I don't know" rather than
an invented fact or number. "Say that again" repeats the last reply from the
history. Every generator returns (clean user sentence, reply, history).

The held-out split keeps every fifth phrasing of each intent and every tenth
slot value apart, so evaluation sees wordings that training never did.
"""
from __future__ import annotations

import random

from .data import Slots, clean_text, render

# (user phrasings, replies). A phrasing may hold {slots} from `Slots`.
# ACCEPT holds, per intent, words of which a fitting reply has one (for evaluation).
INTENTS: dict[str, tuple[list[str], list[str]]] = {
    "greeting": ([
        "Hi.", "Hello.", "Hey.", "Hi there.", "Hello there.", "Hey there.", "Good morning.", "Good afternoon.",
        "Good evening.", "Hi, is anyone there?", "Hello, can you hear me?", "Hey, are you listening?",
        "Hi, I have a question.", "Hello, I need some help.", "Morning!", "Hey, hi.", "Hi, how's it going?",
        "Hello, anybody home?", "Yo.", "Greetings.",
    ], ["Hello! How can I help you?", "Hi there! What can I do for you?", "Hello! What would you like to know?",
        "Hi! How can I help?"]),
    "how_are_you": ([
        "How are you?", "How are you doing?", "How's your day going?", "How are you today?", "Are you doing okay?",
        "How have you been?", "How's everything with you?", "What's up?", "How are things?", "You doing alright?",
    ], ["I'm doing well, thanks for asking. How can I help you?", "I'm fine, thank you. What can I do for you?",
        "All good here, thanks. How can I help?"]),
    "thanks": ([
        "Thank you.", "Thanks.", "Thanks a lot.", "Thank you so much.", "Thanks, that helps.", "Great, thanks.",
        "Perfect, thank you.", "Thanks for your help.", "Cheers.", "That's very helpful, thanks.",
        "Okay, thank you.", "Thanks, that's all I needed.", "Much appreciated.", "Thank you very much.",
        "Awesome, thanks.",
    ], ["You're welcome!", "You're welcome. Is there anything else?", "Happy to help!",
        "Glad I could help. Anything else?"]),
    "goodbye": ([
        "Goodbye.", "Bye.", "Bye bye.", "See you later.", "See you.", "Have a nice day.", "That's all, goodbye.",
        "Okay, bye.", "I'm done, thanks, bye.", "Talk to you later.", "Good night.", "Catch you later.",
        "I have to go now.", "See you tomorrow.", "Take care.",
    ], ["Goodbye! Have a great day.", "Bye! Take care.", "Goodbye, and thanks for stopping by.",
        "See you soon. Have a good day!"]),
    "identity": ([
        "Who are you?", "What are you?", "What's your name?", "Are you a robot?", "Are you a real person?",
        "Am I talking to a human?", "Are you a computer?", "Tell me about yourself.", "What should I call you?",
        "Who am I talking to?", "Are you an AI?", "Who made you?",
    ], ["I'm a voice assistant. I can answer questions and help you find information.",
        "I'm a voice assistant, not a person. How can I help you?",
        "I'm the voice assistant here. Ask me anything about this place."]),
    "abilities": ([
        "What can you do?", "How can you help me?", "What are you able to do?", "What do you know?",
        "What kind of questions can I ask?", "What are you for?", "Can you help me?", "What can I ask you?",
        "What do you do here?", "How does this work?", "I need help.", "Can you help me with something?",
    ], ["I can answer questions about this place, like opening hours, prices and where things are.",
        "I can answer simple questions and help you find information. Just ask.",
        "Of course. Ask me a question and I'll do my best to answer."]),
    "acknowledge": ([
        "Okay.", "Alright.", "Got it.", "I see.", "Cool.", "Sounds good.", "Great.", "Nice.", "Okay, I understand.",
        "Never mind.", "Forget it.", "That's fine.", "No problem.", "Fair enough.", "Oh, okay.",
    ], ["Okay. Let me know if you need anything else.", "Alright. Is there anything else I can help with?",
        "Sure. Just ask if you need anything."]),
    "praise": ([
        "You're great.", "You're very helpful.", "Good job.", "That was helpful.", "I like you.", "You're smart.",
        "Nice work.", "You're awesome.",
    ], ["Thank you, that's kind of you!", "Thanks! I'm glad I could help.", "That's nice to hear, thank you!"]),
    "complaint": ([
        "You're useless.", "That's wrong.", "You didn't answer my question.", "That's not what I asked.",
        "This isn't working.", "You're not helping.", "I don't understand you.", "That makes no sense.",
    ], ["I'm sorry about that. Could you ask me again in other words?",
        "Sorry, I may have misunderstood. Could you say it another way?",
        "I apologize. Please try asking again and I'll do my best."]),
    "joke": ([
        "Tell me a joke.", "Do you know any jokes?", "Say something funny.", "Make me laugh.",
        "Can you tell me a joke?", "Know any good jokes?",
    ], ["Why did the scarecrow win an award? Because he was outstanding in his field.",
        "I told my computer I needed a break, and it said no problem, it would go to sleep.",
        "Why don't eggs tell jokes? They would crack each other up."]),
}

# Requests that need a tool the assistant does not have: (phrasing, what it can't do).
ACCEPT = {"greeting": ["hello", "hi", "good morning", "good afternoon", "good evening"], "how_are_you": ["well", "fine", "good"],
          "thanks": ["welcome", "glad", "happy to help"], "goodbye": ["bye", "goodbye", "take care", "see you", "good day"],
          "identity": ["assistant"], "abilities": ["answer", "help", "ask", "questions"],
          "acknowledge": ["okay", "alright", "sure", "anything else"], "praise": ["thank", "glad", "nice"],
          "complaint": ["sorry", "apologize"], "joke": ["why", "because", "said"]}
CANNOT_ACCEPT = ["can't", "cannot", "not able"]
UNKNOWN_ACCEPT = ["don't know", "do not know", "don't have", "not sure", "sorry"]

CANNOT = [
    ("Set an alarm for seven tomorrow.", "set alarms"), ("Wake me up at six.", "set alarms"),
    ("Start a timer for ten minutes.", "set timers"), ("Remind me to call {name} later.", "set reminders"),
    ("Call {name} for me.", "make phone calls"), ("Can you call my mom?", "make phone calls"),
    ("Send a text to {name}.", "send messages"), ("Text {name} that I'm running late.", "send messages"),
    ("Email {name} the report.", "send emails"), ("Book me a flight to {city}.", "book flights"),
    ("Order a {food} for me.", "place orders"), ("Can you order some {food}?", "place orders"),
    ("Buy a new {thing} online.", "shop online"), ("Turn off the lights.", "control the lights"),
    ("Turn up the heat.", "control the heating"), ("Lock the front door.", "control the doors"),
    ("Play some music.", "play music"), ("Play a song by {name}.", "play music"),
    ("Open the window.", "open windows"), ("Take a picture.", "take pictures"),
    ("Pay my phone bill.", "make payments"), ("Transfer fifty dollars to {name}.", "make payments"),
    ("Book a table for two tonight.", "make reservations"), ("Call me a taxi.", "book rides"),
    ("Add {food} to my shopping list.", "keep lists"), ("Read my messages.", "read your messages"),
    ("Navigate to {place}.", "give directions"), ("Translate this into Spanish.", "translate"),
    ("Schedule a meeting with {name} on Friday.", "manage calendars"), ("Record this conversation.", "record audio"),
]
CANNOT_REPLIES = ["Sorry, I can't {what}.", "I'm sorry, I'm not able to {what}.", "Sorry, I can't {what} from here.",
                  "I'm afraid I can't {what}, but I can answer questions."]

# Factual questions with no card: the honest reply is "I don't know".
UNKNOWN = [
    "What's the capital of {city}'s country?", "How many people live in {city}?", "How far is {city} from here?",
    "What's the weather like in {city} today?", "Will it rain tomorrow?", "What time is it?", "What's the date today?",
    "Who won the game last night?", "What's the score?", "How tall is the tallest building in {city}?",
    "When was {place} built?", "What time does {place} open?", "What time does {place} close?",
    "How much does a ticket cost?", "How much is a student ticket?", "How much does the {thing} cost?",
    "Where can I buy {food}?", "Where is the nearest {food} place?", "Is {place} open on Sunday?",
    "How much is parking?", "What's the wifi password?", "Where are the restrooms?", "When is the next bus?",
    "How long does the tour take?", "What's on the menu today?", "Is there a discount for seniors?",
    "Who is the manager here?", "What's the phone number for {place}?", "How old is {name}?",
    "What's the population of {city}?", "How much does a flight to {city} cost?", "What year is it?",
    "What's the exchange rate for the euro?", "When does the store close tonight?", "Is the pool heated?",
    "What floor is the gym on?", "How many rooms does the hotel have?", "What's the speed limit here?",
    "Do you have {food} today?", "When is {name}'s birthday?",
]
DONT_KNOW = ["I'm sorry, I don't know that.", "Sorry, I don't know.", "I'm sorry, I don't know the answer to that.",
             "I don't know, sorry.", "Sorry, I don't have that information."]
NOTHING_YET = ["Sorry, I haven't said anything yet. How can I help?", "I haven't said anything yet. What can I do for you?"]
REPEAT = ["Say that again.", "Can you repeat that?", "Sorry, what did you say?", "Come again?", "Pardon?",
          "I didn't catch that.", "Could you say that again, please?", "What was that?", "Repeat that, please.",
          "Sorry, I missed that.", "One more time, please.", "Say it again?"]


def _split(items: list, heldout: bool) -> list:
    """Every fifth item is held out; the rest is for training."""
    keep = [x for i, x in enumerate(items) if (i % 5 == 2) == heldout]
    return keep or items


def _fill(text: str, slots: Slots, rng: random.Random) -> str:
    return clean_text(render(text, slots, rng)) if "{" in text else text


def talk_turn(rng: random.Random, slots: Slots, heldout: bool,
              history: tuple[tuple[str, str], ...] = ()) -> tuple[str, str, list[str]]:
    """One conversational (user sentence, reply, accept), clean on both sides."""
    kind = rng.choices(["intent", "cannot", "unknown", "repeat"], weights=[5, 2, 3, 1])[0]
    if kind == "intent":
        intent = rng.choice(sorted(INTENTS))
        phrasings, replies = INTENTS[intent]
        user = rng.choice(_split(phrasings, heldout))
        reply = rng.choice(replies)
        if user.startswith("Good ") and user.endswith(("morning.", "afternoon.", "evening.")):
            reply = f"{user[:-1]}! How can I help you?"
        return user, reply, ACCEPT[intent]
    if kind == "cannot":
        text, what = rng.choice(_split(CANNOT, heldout))
        return _fill(text, slots, rng), rng.choice(CANNOT_REPLIES).format(what=what), CANNOT_ACCEPT
    if kind == "unknown":
        return _fill(rng.choice(_split(UNKNOWN, heldout)), slots, rng), rng.choice(DONT_KNOW), UNKNOWN_ACCEPT
    user = rng.choice(_split(REPEAT, heldout))
    if history:
        return user, history[-1][1], [history[-1][1].rstrip(".!?")]
    return user, rng.choice(NOTHING_YET), ["haven't said"]
