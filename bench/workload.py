"""A seeded, realistic chat workload for the end-to-end benchmark: what a support assistant sees.

Four assistants ("apps"), each with its own shared system prompt of ~300-500 tokens, answer
questions about a catalogue of intents (12 per app, 48 in all). Each request is, independently:
  - with probability `unique_share`, a long-tail question asked once (it names an order, a date
    or an amount of its own, so no cache may answer it and no two are alike);
  - otherwise an intent drawn by a Zipf law over the catalogue (rank r has weight 1 / r**s; the
    ranks are a seeded shuffle, so the popular intents are spread over the apps), worded
    canonically ("How do I {intent}?") or, with probability `paraphrase_share`, by one of six
    templated rewordings ("Can you tell me how to {intent}?", ...).
Every request carries its app's system prompt, temperature 0 and a short `max_tokens`.

Each item is labelled by what a perfect cache could do with it, given the items before it:
`new` (first time this intent is asked), `repeat` (this exact wording was asked before: an exact
cache can answer), `paraphrase` (the intent was asked before in other words: only a semantic cache
can answer), `unique` (never answerable). The same seed always gives the same sequence.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

CANONICAL = "How do I {intent}?"
PARAPHRASES = (
    "How can I {intent}?",
    "What are the steps to {intent}?",
    "Can you tell me how to {intent}?",
    "I need to {intent}. What should I do?",
    "What's the way to {intent}?",
    "Please explain how I can {intent}.",
)
KINDS = ("new", "repeat", "paraphrase", "unique")


@dataclass(frozen=True)
class App:
    name: str
    persona: str
    topics: tuple[str, ...]
    actions: tuple[str, ...]
    intents: tuple[str, ...]
    unique: tuple[str, ...]  # long-tail templates: {n} a number, {d} a day, {intent}


APPS = (
    App(
        name="shop",
        persona="You are the support assistant of Northwind, an online shop for shoes, clothing"
        " and outdoor gear that ships to twelve European countries.",
        topics=("deliveries", "returns", "exchanges", "refunds", "payments", "gift cards",
                "discount codes", "sizes", "damaged items", "store pickups", "invoices",
                "accounts"),
        actions=("confirm the order number first", "check the delivery window in the order"
                 " history", "quote the policy in one short sentence", "never promise a date"
                 " the carrier has not confirmed", "offer the self-service page before a call",
                 "escalate to a human agent when the customer is upset"),
        intents=("track my order", "return a pair of shoes", "change my delivery address",
                 "cancel my order", "use a gift card", "get a refund for a damaged item",
                 "exchange a jacket for another size", "pay in installments", "find my invoice",
                 "apply a discount code", "reset my account password",
                 "arrange a store pickup"),
        unique=("My order {n} placed on day {d} of the month still says processing. Can I"
                " {intent} now?", "I was charged {n} cents twice on day {d}. How do I {intent}?"),
    ),
    App(
        name="bank",
        persona="You are the virtual assistant of Harbor Bank, a retail bank with current"
        " accounts, savings accounts, debit and credit cards and online banking.",
        topics=("cards", "limits", "transfers", "standing orders", "statements", "PINs",
                "disputes", "savings", "fraud", "online banking", "phone numbers",
                "account closure"),
        actions=("never ask for the full card number or the PIN", "verify the customer's"
                 " identity through the app first", "state fees exactly as listed",
                 "point to the secure message inbox for documents", "explain the cut-off"
                 " times for transfers", "escalate suspected fraud immediately"),
        intents=("block my debit card", "raise my card limit", "open a savings account",
                 "order a new PIN", "dispute a card payment", "set up a standing order",
                 "change my registered phone number", "download my account statement",
                 "close my account", "enable international payments", "report a lost card",
                 "activate online banking"),
        unique=("A payment of {n} euros on day {d} is not mine. How do I {intent}?",
                "My transfer {n} from day {d} has not arrived. Can I {intent}?"),
    ),
    App(
        name="travel",
        persona="You are the booking assistant of Skyway Travel, an agency that sells flights,"
        " hotels, rental cars and airport transfers.",
        topics=("flight changes", "baggage", "hotel bookings", "cancellations", "seats",
                "passengers", "transfers", "check-in", "pets", "ticket names", "upgrades",
                "special assistance"),
        actions=("ask for the booking reference first", "quote the fare rules of the ticket",
                 "mention change fees before confirming", "check the airline's own policy",
                 "offer alternatives when a request is impossible", "summarise the new"
                 " itinerary at the end"),
        intents=("change my flight date", "add checked baggage to my booking",
                 "cancel my hotel reservation", "get a refund for a cancelled flight",
                 "choose my seat", "add a passenger to my booking", "book an airport transfer",
                 "check in online", "bring my pet on the flight", "change the name on my ticket",
                 "upgrade to business class", "request a wheelchair at the airport"),
        unique=("Booking {n} leaves on day {d}. Is it still possible to {intent}?",
                "I paid {n} euros for booking {d}{n}. How do I {intent}?"),
    ),
    App(
        name="it",
        persona="You are the IT helpdesk assistant of Contoso, a company of 3,000 employees"
        " using laptops, phones, email, VPN and shared drives.",
        topics=("VPN", "passwords", "printers", "laptops", "file recovery", "two-factor"
                " authentication", "calendars", "account lockouts", "mailboxes", "wifi",
                "phones", "phishing"),
        actions=("ask for the asset tag first", "give numbered steps", "link the knowledge base"
                 " article", "never ask for a password", "open a ticket when the steps fail",
                 "warn before any step that deletes data"),
        intents=("connect to the office VPN", "reset my email password",
                 "install the printer driver", "request a new laptop", "recover a deleted file",
                 "set up two-factor authentication", "share a calendar with my team",
                 "unlock my account", "increase my mailbox quota", "join the guest wifi",
                 "set up email on my phone", "report a phishing email"),
        unique=("Ticket {n} from day {d} is still open. How do I {intent}?",
                "Laptop with asset tag {n} shows error {d}. Can I {intent}?"),
    ),
)  # fmt: skip


def system_prompt(app: App) -> str:
    """The app's shared system prompt: its persona and one rule per (topic, action) pair used."""
    rules = [
        f"Rule {i + 1}: when a customer asks about {topic}, {app.actions[i % len(app.actions)]},"
        " and answer in at most three sentences."
        for i, topic in enumerate(app.topics)
    ]
    closing = (
        "Be precise and polite. If you do not know the answer, say so and offer to open a"
        " ticket. Never invent order numbers, prices, dates or policies."
    )
    return " ".join([app.persona, *rules, closing])


@dataclass(frozen=True)
class Item:
    index: int
    app: str
    intent: str | None  # None for unique questions
    question: str
    kind: str  # one of KINDS

    def body(self, model: str, max_tokens: int) -> dict[str, Any]:
        app = next(a for a in APPS if a.name == self.app)
        return {
            "model": model,
            "messages": [
                {"role": "system", "content": system_prompt(app)},
                {"role": "user", "content": self.question},
            ],
            "temperature": 0,
            "max_tokens": max_tokens,
        }


def zipf_weights(count: int, exponent: float) -> list[float]:
    return [1.0 / (rank**exponent) for rank in range(1, count + 1)]


def generate(
    count: int,
    *,
    seed: int = 8,
    zipf: float = 1.0,
    unique_share: float = 0.15,
    paraphrase_share: float = 0.25,
) -> list[Item]:
    """`count` requests, the same for the same arguments."""
    if count < 0 or not 0 <= unique_share <= 1 or not 0 <= paraphrase_share <= 1 or zipf < 0:
        raise ValueError("count >= 0, shares in [0, 1] and zipf >= 0 are required")
    rng = random.Random(seed)
    catalogue = [(app, intent) for app in APPS for intent in app.intents]
    rng.shuffle(catalogue)  # rank order: the most asked intent first
    weights = zipf_weights(len(catalogue), zipf)
    seen_texts: set[tuple[str, str]] = set()
    seen_intents: set[tuple[str, str]] = set()
    items: list[Item] = []
    for index in range(count):
        if rng.random() < unique_share:
            app = rng.choice(APPS)
            template = rng.choice(app.unique)
            question = template.format(
                n=rng.randrange(10_000, 99_999), d=rng.randrange(1, 29),
                intent=rng.choice(app.intents),
            )  # fmt: skip
            items.append(Item(index, app.name, None, question, "unique"))
            continue
        app, intent = rng.choices(catalogue, weights=weights)[0]
        wording = rng.choice(PARAPHRASES) if rng.random() < paraphrase_share else CANONICAL
        question = wording.format(intent=intent)
        if (app.name, question) in seen_texts:
            kind = "repeat"
        elif (app.name, intent) in seen_intents:
            kind = "paraphrase"
        else:
            kind = "new"
        seen_texts.add((app.name, question))
        seen_intents.add((app.name, intent))
        items.append(Item(index, app.name, intent, question, kind))
    return items


def describe(items: list[Item]) -> dict[str, Any]:
    """Counts and shares per kind and app, and the share a perfect exact / semantic cache serves."""
    kinds = Counter(item.kind for item in items)
    total = max(1, len(items))
    return {
        "requests": len(items),
        "kinds": {kind: kinds.get(kind, 0) for kind in KINDS},
        "shares": {kind: round(kinds.get(kind, 0) / total, 4) for kind in KINDS},
        "apps": dict(sorted(Counter(item.app for item in items).items())),
        "distinct_questions": len({(i.app, i.question) for i in items}),
        "exact_cache_bound": round(kinds.get("repeat", 0) / total, 4),
        "semantic_cache_bound": round(
            (kinds.get("repeat", 0) + kinds.get("paraphrase", 0)) / total, 4
        ),
    }
