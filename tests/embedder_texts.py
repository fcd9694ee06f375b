"""Deterministic varied texts for the embedder's precision checks: short and long (past the model's
limit), several scripts, code, emoji and odd whitespace; `varied_texts(500)` is the same list on every run."""

from __future__ import annotations

import random

ENGLISH = tuple(
    [
        "the",
        "database",
        "keeps",
        "every",
        "order",
        "in",
        "a",
        "table",
        "partitioned",
        "by",
        "month",
        "so",
        "that",
        "old",
        "data",
        "can",
        "be",
        "archived",
        "while",
        "the",
        "gardener",
        "plants",
        "tomatoes",
        "after",
        "the",
        "last",
        "frost",
        "and",
        "waters",
        "them",
        "every",
        "morning",
        "orbital",
        "mechanics",
        "explains",
        "why",
        "a",
        "satellite",
        "speeds",
        "up",
        "as",
        "it",
        "falls",
        "closer",
        "to",
        "the",
        "planet",
        "good",
        "bread",
        "needs",
        "time",
        "more",
        "than",
        "kneading",
        "and",
        "a",
        "hot",
        "oven",
        "with",
        "steam",
        "for",
        "the",
        "first",
        "minutes",
        "jazz",
        "musicians",
        "trade",
        "solos",
        "and",
        "quote",
        "standards",
        "while",
        "the",
        "rhythm",
        "section",
        "keeps",
        "the",
        "form",
    ]
)

SCRIPTS = {
    "de": "Die Katze schläft auf dem warmen Fensterbrett, während draußen der Regen gegen die Scheiben "
    "prasselt und die Straßenbahn quietschend um die Ecke biegt.",
    "fr": "Le boulanger sort les baguettes du four à l'aube ; l'odeur du pain chaud emplit la rue "
    "et les premiers clients attendent déjà devant la porte.",
    "es": "¿Dónde está la estación de tren más cercana? Necesito llegar a Sevilla antes de las ocho "
    "de la tarde para la reunión con mis compañeros.",
    "ru": "Москва — столица России, крупнейший по численности населения город страны; здесь "
    "находятся Кремль, Красная площадь и множество музеев.",
    "el": "Η Ακρόπολη της Αθήνας είναι ένας από τους σημαντικότερους αρχαιολογικούς χώρους του "
    "κόσμου και δέχεται εκατομμύρια επισκέπτες κάθε χρόνο.",
    "zh": "机器学习是人工智能的一个分支，它使计算机能够在没有明确编程的情况下从数据中学习并做出预测。",
    "ja": "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。"
    "桜の季節には多くの観光客が訪れます。",
    "ko": "서울은 대한민국의 수도이며, 한강을 중심으로 발전한 현대적인 도시입니다. 맛있는 음식이 많습니다.",
    "ar": "القاهرة هي عاصمة مصر وأكبر مدنها، وتقع على ضفاف نهر النيل وتضم العديد من المعالم التاريخية.",
    "he": "ירושלים היא עיר עתיקה וקדושה לשלוש הדתות המונותאיסטיות, ובה אתרים היסטוריים רבים.",
    "hi": "भारत एक विशाल देश है जिसमें अनेक भाषाएँ, धर्म और संस्कृतियाँ एक साथ फलती-फूलती हैं।",
    "th": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย มีวัดวาอารามและตลาดน้ำที่มีชื่อเสียงมากมาย",
    "tr": "İstanbul, Avrupa ile Asya'yı birbirine bağlayan Boğaz'ın iki yakasına "
    "kurulmuş tarihi bir şehirdir.",
    "vi": "Hà Nội là thủ đô của Việt Nam, nổi tiếng với phố cổ, hồ Hoàn Kiếm và những món ăn đường phố.",
}

CODE = (
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "SELECT customer_id, SUM(total) AS spent FROM orders WHERE created_at >= '2024-01-01' "
    "GROUP BY customer_id HAVING SUM(total) > 1000 ORDER BY spent DESC;",
    'fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    "const fetchUser = async (id) => {\n  const res = await fetch(`/api/users/${id}`);\n"
    "  return res.json();\n};",
    '#include <stdio.h>\nint main(void) { for (int i = 0; i < 3; ++i) printf("%d\\n", i); return 0; }',
    '{"name": "embedder", "port": 50053, "models": ["all-MiniLM-L6-v2"], "batch": {"max": 64}}',
    "git rebase -i HEAD~3 && git push --force-with-lease origin feature/embeddings",
)

EMOJI = tuple(["😀", "🚀", "🌍", "🍕", "🎉", "❤️", "👍", "🔥", "🐍", "☕", "🌧️", "👩\u200d💻", "🇯🇵", "✅", "⚠️"])
WHITESPACE = (" ", "  ", "\t", "\n", "\n\n", " \u00a0 ", "\u3000", "\r\n")


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(ENGLISH) for _ in range(count))


def _make(rng: random.Random, kind: int) -> str:
    if kind == 0:  # a word or two
        return _words(rng, rng.randint(1, 2))
    if kind == 1:  # a sentence
        return _words(rng, rng.randint(5, 25)).capitalize() + "."
    if kind == 2:  # long, up to and past the model's 256-token limit (truncated there)
        return _words(rng, rng.randint(120, 320))
    if kind == 3:  # another script, sometimes repeated to a long text
        text = SCRIPTS[rng.choice(sorted(SCRIPTS))]
        return " ".join([text] * rng.choice((1, 1, 2, 6)))
    if kind == 4:  # mixed scripts
        a, b = rng.sample(sorted(SCRIPTS), 2)
        return f"{SCRIPTS[a][:60]} {_words(rng, 4)} {SCRIPTS[b][:60]}"
    if kind == 5:
        return rng.choice(CODE)
    if kind == 6:  # emoji, alone or in a sentence
        emoji = " ".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 6)))
        return emoji if rng.random() < 0.3 else f"{_words(rng, rng.randint(3, 12))} {emoji}"
    if kind == 7:  # odd whitespace around and inside
        sep = rng.choice(WHITESPACE)
        return sep + sep.join(_words(rng, 1) for _ in range(rng.randint(2, 10))) + rng.choice(WHITESPACE)
    if kind == 8:  # numbers, punctuation, urls
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        return (
            f"Order #{rng.randint(1, 99999)} shipped on 2024-{month:02d}-{day:02d} "
            f"to https://example.com/track?id={rng.randint(10**5, 10**6)} (${rng.random() * 500:.2f})!"
        )
    return rng.choice("abcxyz?!.") * rng.randint(1, 3)  # single characters and punctuation


def varied_texts(count: int = 500, seed: int = 22) -> list[str]:
    """`count` texts cycling through ten kinds, the same on every call with the same seed."""
    rng = random.Random(seed)
    return [_make(rng, index % 10) for index in range(count)]
