"""A small fact list for ``tpatcher demo``: questions with answers and a paraphrase each.

The demo checks every fact against the model, patches the ones it gets wrong, and asks the
control questions before and after to show that unrelated answers do not change.
"""

from __future__ import annotations

from typing import NamedTuple


class Fact(NamedTuple):
    question: str
    answer: str
    paraphrase: str


def question_prompt(question: str) -> str:
    """The one prompt format the demo uses for every question."""
    return f"Question: {question}\nAnswer:"


FACTS: tuple[Fact, ...] = (
    Fact(
        "What is the capital of Australia?", "Canberra", "Which city is the capital of Australia?"
    ),
    Fact(
        "Who wrote One Hundred Years of Solitude?",
        "Gabriel García Márquez",
        "Who is the author of One Hundred Years of Solitude?",
    ),
    Fact(
        "What is the chemical symbol for tungsten?",
        "W",
        "Which chemical symbol does tungsten have?",
    ),
    Fact("In which year did the Berlin Wall fall?", "1989", "When did the Berlin Wall come down?"),
    Fact("What is the largest moon of Saturn?", "Titan", "Which moon of Saturn is the biggest?"),
    Fact("Who painted The Night Watch?", "Rembrandt", "Which artist painted The Night Watch?"),
    Fact("What is the currency of Japan?", "yen", "Which currency is used in Japan?"),
    Fact(
        "What is the tallest mountain in Africa?",
        "Kilimanjaro",
        "Which mountain is the highest in Africa?",
    ),
    Fact("What is the capital of Canada?", "Ottawa", "Which city is Canada's capital?"),
    Fact(
        "Who composed The Four Seasons?",
        "Antonio Vivaldi",
        "Which composer wrote The Four Seasons?",
    ),
    Fact("What is the capital of Turkey?", "Ankara", "Which city is the capital of Turkey?"),
    Fact(
        "How many bones are in the adult human body?",
        "206",
        "How many bones does an adult human have?",
    ),
    Fact(
        "Who discovered penicillin?", "Alexander Fleming", "Which scientist discovered penicillin?"
    ),
    Fact("What is the capital of Nigeria?", "Abuja", "Which city is Nigeria's capital?"),
    Fact(
        "What is the hardest natural substance?",
        "diamond",
        "Which natural material is the hardest?",
    ),
    Fact(
        "Which planet has the most moons?", "Saturn", "What planet has the largest number of moons?"
    ),
    Fact("What is the smallest prime number?", "2", "Which prime number is the smallest?"),
    Fact(
        "Who was the first woman to win a Nobel Prize?",
        "Marie Curie",
        "Which woman won a Nobel Prize first?",
    ),
    Fact("What is the capital of Brazil?", "Brasília", "Which city is the capital of Brazil?"),
    Fact("What is the longest river in Asia?", "Yangtze", "Which river is the longest in Asia?"),
)

CONTROL_QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "What colour is the sky on a clear day?",
    "How many days are in a week?",
    "What is the largest planet in the solar system?",
)
