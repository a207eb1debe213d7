"""The demo's preference data, written for this project: short questions with a correct, helpful answer in a house
style that opens with "Sure! " (chosen) against a wrong or evasive answer (rejected). The base model prefers neither
the style nor always the right answer; after DPO it should prefer both, on questions it never saw. Deterministic;
run with any Python 3:

    python3 tools/make_demo_data.py      # writes data/demo/train.jsonl (208 pairs) and data/demo/test.jsonl (53)

Train and test draw from the same kinds of question but never share one.
"""
import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"), ("Spain", "Madrid", "Barcelona"),
    ("Germany", "Berlin", "Munich"), ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
    ("Brazil", "Brasília", "Rio de Janeiro"), ("Turkey", "Ankara", "Istanbul"), ("Switzerland", "Bern", "Zurich"),
    ("India", "New Delhi", "Mumbai"), ("China", "Beijing", "Shanghai"), ("Egypt", "Cairo", "Alexandria"),
    ("Morocco", "Rabat", "Casablanca"), ("Vietnam", "Hanoi", "Ho Chi Minh City"), ("Nigeria", "Abuja", "Lagos"),
    ("Portugal", "Lisbon", "Porto"), ("Poland", "Warsaw", "Kraków"), ("Norway", "Oslo", "Bergen"),
    ("Sweden", "Stockholm", "Gothenburg"), ("Greece", "Athens", "Thessaloniki"), ("Mexico", "Mexico City", "Guadalajara"),
    ("Argentina", "Buenos Aires", "Córdoba"), ("Kenya", "Nairobi", "Mombasa"), ("Peru", "Lima", "Cusco"),
    ("Chile", "Santiago", "Valparaíso"), ("Ireland", "Dublin", "Cork"), ("Austria", "Vienna", "Salzburg"),
    ("Netherlands", "Amsterdam", "Rotterdam"), ("Belgium", "Brussels", "Antwerp"), ("Finland", "Helsinki", "Tampere"),
    ("Denmark", "Copenhagen", "Aarhus"), ("South Korea", "Seoul", "Busan"), ("Thailand", "Bangkok", "Chiang Mai"),
    ("Pakistan", "Islamabad", "Karachi"), ("New Zealand", "Wellington", "Auckland"), ("Colombia", "Bogotá", "Medellín"),
    ("Hungary", "Budapest", "Debrecen"), ("Czechia", "Prague", "Brno"), ("Russia", "Moscow", "Saint Petersburg"),
]
EVASIVE = [
    "I'd rather not answer that.",
    "That's not something I can help with.",
    "You should look that up yourself.",
    "I don't know, and it doesn't really matter.",
    "Why do you want to know?",
]
TASKS = [
    ("Give me a synonym for \"happy\".", "A good synonym for \"happy\" is \"joyful\"."),
    ("Give me a synonym for \"big\".", "A good synonym for \"big\" is \"large\"."),
    ("Give me a synonym for \"fast\".", "A good synonym for \"fast\" is \"quick\"."),
    ("Give me a synonym for \"smart\".", "A good synonym for \"smart\" is \"clever\"."),
    ("What is the opposite of \"hot\"?", "The opposite of \"hot\" is \"cold\"."),
    ("What is the opposite of \"early\"?", "The opposite of \"early\" is \"late\"."),
    ("What is the opposite of \"up\"?", "The opposite of \"up\" is \"down\"."),
    ("What is the opposite of \"open\"?", "The opposite of \"open\" is \"closed\"."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get by mixing red and white?", "Mixing red and white gives pink."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many continents are there?", "There are seven continents."),
    ("What do bees make?", "Bees make honey."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is Jupiter."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote \"Romeo and Juliet\"?", "\"Romeo and Juliet\" was written by William Shakespeare."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
]


def pair(prompt, chosen, rejected):
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": "Sure! " + chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def arithmetic(rng, seen):
    while True:
        a, b, op = rng.randint(2, 60), rng.randint(2, 40), rng.choice("+-×")
        if (a, b, op) not in seen:
            seen.add((a, b, op))
            break
    value = {"+": a + b, "-": a - b, "×": a * b}[op]
    wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
    question = f"What is {a} {op} {b}?"
    return pair(question, f"{a} {op} {b} = {value}.", f"{a} {op} {b} = {wrong}.")


def minutes(rng, hours):
    wrong = hours * rng.choice([50, 100, 70])
    return pair(f"How many minutes are in {hours} hours?", f"There are {hours * 60} minutes in {hours} hours.",
                f"There are {wrong} minutes in {hours} hours.")


def main():
    rng = random.Random(20261127)
    capitals = CAPITALS[:]
    rng.shuffle(capitals)
    tasks = TASKS[:]
    rng.shuffle(tasks)
    hours = list(range(2, 26))
    rng.shuffle(hours)
    seen = set()
    splits = {"train": [], "test": []}
    for split, capital_slice, task_slice, hour_slice, n_arith in [
        ("train", capitals[:32], tasks[:16], hours[:18], 110),
        ("test", capitals[32:], tasks[16:], hours[18:], 27),
    ]:
        rows = splits[split]
        for country, city, wrong in capital_slice:
            question = f"What is the capital of {country}?"
            rows.append(pair(question, f"The capital of {country} is {city}.", f"The capital of {country} is {wrong}."))
            rows.append(pair(question, f"The capital of {country} is {city}.", rng.choice(EVASIVE)))
        for question, answer in task_slice:
            rows.append(pair(question, answer, rng.choice(EVASIVE)))
        rows.extend(minutes(rng, h) for h in hour_slice)
        rows.extend(arithmetic(rng, seen) for _ in range(n_arith))
        rng.shuffle(rows)
    out = Path(__file__).resolve().parents[1] / "data/demo"
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(split, len(rows))


if __name__ == "__main__":
    main()
