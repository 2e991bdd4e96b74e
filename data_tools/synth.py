"""`synth`: a procedural data set of coloured shapes, for every task, in English or Chinese.

Each image holds 1-3 shapes on a light, plain or lightly noised background. The image is split into a
3x3 grid and each shape sits inside its own cell, so shapes never overlap and an object's position
("top left", "center", ...) is the cell its centre falls in. Texts are a deterministic function of the
drawn attributes (shape, colour, size, position) up to phrasing: templates and a few synonyms. So a
small model can learn it, and a model that ignores the image cannot.

Every image and text is drawn from an RNG seeded by (seed, index), so a record does not depend on the
others: the same seed gives byte-identical files, and the images are the same for every task and
language (only the texts differ). Each record keeps its ground truth in "objects".

    python -m data_tools synth --task caption --n 2000 --out-dir data/shapes --seed 0
    python -m data_tools synth --task vqa --n 500 --out-dir data/shapes --lang zh
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .clean import user_errors
from .files import atomic_write, atomic_write_text
from .jsonl import JsonlWriter
from .records import IMAGE_TOKEN, TASKS, normalize_record

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Well apart in RGB and all far from the light backgrounds, so a pixel's nearest colour is unambiguous.
COLORS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (235, 200, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
# Row-major 3x3 grid: POSITIONS[row * 3 + col].
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
BACKGROUNDS = ((245, 245, 245), (235, 235, 230), (240, 238, 225), (228, 236, 240), (238, 230, 238))
NOISE_STD = 6.0
MIN_IMAGE_SIZE = 48  # below this a small circle and a small cross are the same 5x5 blob

# --- words ------------------------------------------------------------------------------------------
# Each language: names used in captions (first one is canonical), and VQA answer variants that a real
# annotator might give for the same thing.
EN = {
    "color": {c: [c] for c in COLORS},
    "shape": {
        "circle": ["circle", "disk"],
        "square": ["square"],
        "triangle": ["triangle"],
        "diamond": ["diamond", "rhombus"],
        "cross": ["cross", "plus sign"],
    },
    "plural": {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
               "cross": "crosses"},
    "size": {"small": ["small", "little"], "large": ["large", "big"]},
    "pos": {
        "top left": ["in the top left", "in the top left corner of the image", "at the upper left"],
        "top": ["at the top", "at the top of the image", "near the top"],
        "top right": ["in the top right", "in the top right corner of the image", "at the upper right"],
        "left": ["on the left", "on the left side of the image", "at the left"],
        "center": ["in the center", "in the middle of the image", "in the middle"],
        "right": ["on the right", "on the right side of the image", "at the right"],
        "bottom left": ["in the bottom left", "in the bottom left corner of the image", "at the lower left"],
        "bottom": ["at the bottom", "at the bottom of the image", "near the bottom"],
        "bottom right": ["in the bottom right", "in the bottom right corner of the image",
                         "at the lower right"],
    },
    "number": ["zero", "one", "two", "three"],
    "answer_variants": {
        "purple": ["violet"],
        "blue": ["dark blue"],
        "green": ["dark green"],
        "black": ["dark"],
        "orange": ["orange red"],
        "circle": ["round", "circular"],
        "square": ["box", "rectangle"],
        "diamond": ["rhombus"],
        "cross": ["plus", "plus sign"],
        "top left": ["upper left"],
        "top right": ["upper right"],
        "bottom left": ["lower left"],
        "bottom right": ["lower right"],
        "center": ["middle"],
        "left": ["on left"],
        "right": ["on right"],
        "yes": ["yeah"],
    },
}
ZH = {
    "color": {
        "red": ["红色"],
        "orange": ["橙色"],
        "yellow": ["黄色"],
        "green": ["绿色"],
        "blue": ["蓝色"],
        "purple": ["紫色"],
        "black": ["黑色"],
    },
    "shape": {
        "circle": ["圆形", "圆"],
        "square": ["正方形", "方块"],
        "triangle": ["三角形"],
        "diamond": ["菱形"],
        "cross": ["十字形", "十字"],
    },
    "size": {"small": ["小"], "large": ["大"]},
    "pos": {
        "top left": ["左上角", "左上方"],
        "top": ["上方", "顶部"],
        "top right": ["右上角", "右上方"],
        "left": ["左侧", "左边"],
        "center": ["中间", "中央"],
        "right": ["右侧", "右边"],
        "bottom left": ["左下角", "左下方"],
        "bottom": ["下方", "底部"],
        "bottom right": ["右下角", "右下方"],
    },
    "number": ["零", "一", "两", "三"],
    "answer_variants": {
        "红色": ["红"],
        "橙色": ["橘色"],
        "黄色": ["黄"],
        "绿色": ["绿"],
        "蓝色": ["蓝"],
        "紫色": ["紫"],
        "黑色": ["黑"],
        "圆形": ["圆"],
        "正方形": ["方形"],
        "三角形": ["三角"],
        "十字形": ["十字"],
        "左上角": ["左上"],
        "右上角": ["右上"],
        "左下角": ["左下"],
        "右下角": ["右下"],
        "左侧": ["左边"],
        "右侧": ["右边"],
        "上方": ["上面"],
        "下方": ["下面"],
        "中间": ["中央"],
        "有": ["有的"],
        "是": ["是的", "对"],
        "不是": ["不对"],
    },
}
WORDS = {"en": EN, "zh": ZH}

TEXT_ONLY_FRACTION = 0.05  # LLaVA mixes in text-only conversations; so do we
TEXT_ONLY = {
    "en": [
        ("How many sides does a triangle have?", "A triangle has three sides."),
        ("How many corners does a square have?", "A square has four corners."),
        ("Which color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
        ("Does a circle have any corners?", "No, a circle has no corners."),
        ("Name three colors of a rainbow.", "Red, yellow and blue are colors of a rainbow."),
        (
            "What is the difference between a square and a diamond?",
            "A diamond is a square turned by 45 degrees, so it stands on a corner.",
        ),
    ],
    "zh": [
        ("三角形有几条边？", "三角形有三条边。"),
        ("正方形有几个角？", "正方形有四个角。"),
        ("蓝色和黄色混合会得到什么颜色？", "蓝色和黄色混合会得到绿色。"),
        ("圆形有角吗？", "没有，圆形没有角。"),
        ("说出彩虹中的三种颜色。", "红色、黄色和蓝色都是彩虹中的颜色。"),
        ("正方形和菱形有什么区别？",
         "菱形可以看成是旋转了45度的正方形，它以一个角朝下。"),
    ],
}


# --- scenes ------------------------------------------------------------------------------------------
def make_scene(seed: int, index: int, image_size: int = 64) -> list[dict]:
    """The objects of image `index`: shape, color, size, position and pixel bbox, in reading order."""
    rng = random.Random(f"synth-scene:{seed}:{index}")
    n = rng.choice((1, 1, 2, 2, 3))
    cells = sorted(rng.sample(range(9), n))  # sorted: objects come in reading order (top-left first)
    cell = image_size / 3
    pairs = set()
    objects = []
    for c in cells:
        while True:  # distinct (shape, colour) pairs so that "the red circle" names one object
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            if (shape, color) not in pairs:
                pairs.add((shape, color))
                break
        size = rng.choice(SIZES)
        r = int(cell * (0.42 if size == "large" else 0.25))
        row, col = divmod(c, 3)
        # Jitter the centre but keep the whole shape inside its cell (1 px margin).
        lo_x, hi_x = int(col * cell) + r + 1, int((col + 1) * cell) - r - 2
        lo_y, hi_y = int(row * cell) + r + 1, int((row + 1) * cell) - r - 2
        cx, cy = rng.randint(lo_x, max(lo_x, hi_x)), rng.randint(lo_y, max(lo_y, hi_y))
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": size,
                "position": position_of(cx, cy, image_size),
                "bbox": [cx - r, cy - r, cx + r, cy + r],
            }
        )
    return objects


def position_of(x: float, y: float, image_size: int) -> str:
    """The grid position name of a pixel: the attribute is derived from where the shape was drawn."""
    col, row = min(int(x * 3 / image_size), 2), min(int(y * 3 / image_size), 2)
    return POSITIONS[row * 3 + col]


def draw_scene(objects: list[dict], seed: int, index: int, image_size: int = 64) -> Image.Image:
    """Render the objects on a light background (plain or with light Gaussian noise)."""
    rng = random.Random(f"synth-background:{seed}:{index}")
    bg = rng.choice(BACKGROUNDS)
    if rng.random() < 0.5:
        noise = np.random.default_rng([seed, index]).normal(0.0, NOISE_STD, (image_size, image_size, 3))
        pixels = np.clip(np.asarray(bg, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        im = Image.fromarray(pixels, "RGB")
    else:
        im = Image.new("RGB", (image_size, image_size), bg)
    draw = ImageDraw.Draw(im)
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, (x1 - x0) // 2
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:  # cross: arms a third of the width
            arm = max(1, r // 3)
            draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
            draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    return im


# --- English and Chinese phrasing -----------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _join_zh(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]


def _noun_phrase(o: dict, lang: str, rng: random.Random, *, size: bool, pos: bool,
                 article: bool = True) -> str:
    """ "a small red circle on the left" / "左侧的一个小的红色圆形" with random synonyms."""
    w = WORDS[lang]
    color, shape = rng.choice(w["color"][o["color"]]), rng.choice(w["shape"][o["shape"]])
    if lang == "zh":
        core = (rng.choice(w["size"][o["size"]]) + "的" if size else "") + color + shape
        return ((rng.choice(w["pos"][o["position"]]) + "的" if pos else "") + ("一个" if article else "")
                + core)
    words = ([rng.choice(w["size"][o["size"]])] if size else []) + [color, shape]
    phrase = " ".join(words)
    if article:
        phrase = f"{_article(phrase)} {phrase}"
    return phrase + (" " + rng.choice(w["pos"][o["position"]]) if pos else "")


def _count_en(n: int) -> str:
    return EN["number"][n]


def caption(objects: list[dict], lang: str, rng: random.Random, template: int) -> str:
    """One caption of the scene; `template` (0-5) picks the sentence pattern, `rng` the synonyms."""
    n = len(objects)
    np_ = lambda o, size, pos: _noun_phrase(o, lang, rng, size=size, pos=pos)
    if lang == "en":
        if template == 0:
            return _join_en([np_(o, False, True) for o in objects])
        if template == 1:
            if n == 1:
                return f"there is {np_(objects[0], True, True)}"
            return f"there are {_count_en(n)} shapes: " + _join_en([np_(o, True, True) for o in objects])
        if template == 2:
            return _join_en([np_(o, False, False) for o in objects])
        if template == 3:
            return "an image of " + _join_en([np_(o, True, False) for o in objects])
        if template == 4:
            return ("a picture showing " + _join_en([np_(o, True, True) for o in objects])
                    + " on a light background")
        return _join_en([np_(o, True, True) for o in objects])
    if template == 0:
        return _join_zh([np_(o, False, True) for o in objects])
    if template == 1:
        if n == 1:
            o = objects[0]
            return (f"图中有{_noun_phrase(o, 'zh', rng, size=True, pos=False)}，"
                    f"位于{rng.choice(ZH['pos'][o['position']])}。")
        return (f"图中有{ZH['number'][n]}个图形：" + _join_zh([np_(o, True, True) for o in objects])
                + "。")
    if template == 2:
        return _join_zh([np_(o, False, False) for o in objects])
    if template == 3:
        return "一张有" + _join_zh([np_(o, True, False) for o in objects]) + "的图片"
    if template == 4:
        parts = [rng.choice(ZH["pos"][o["position"]]) + "有"
                 + _noun_phrase(o, "zh", rng, size=True, pos=False) for o in objects]
        return "，".join(parts) + "。"
    return "浅色背景上有" + _join_zh([np_(o, True, True) for o in objects])


N_TEMPLATES = 6


def captions(objects: list[dict], lang: str, rng: random.Random, k: int = 5) -> list[str]:
    """`k` captions in distinct sentence patterns."""
    return [caption(objects, lang, rng, t) for t in rng.sample(range(N_TEMPLATES), k)]


def canonical_caption(objects: list[dict], lang: str) -> str:
    """The fixed phrasing (pattern 0, first synonyms): used for retrieval negatives."""
    w = WORDS[lang]
    if lang == "en":
        return _join_en(
            [
                f"{_article(w['color'][o['color']][0])} {w['color'][o['color']][0]} "
                f"{w['shape'][o['shape']][0]} {w['pos'][o['position']][0]}"
                for o in objects
            ]
        )
    return _join_zh(
        [f"{w['pos'][o['position']][0]}的一个{w['color'][o['color']][0]}{w['shape'][o['shape']][0]}"
         for o in objects]
    )


# --- VQA ---------------------------------------------------------------------------------------------
def annotator_answers(truth: str, wrong_pool: list[str], lang: str, rng: random.Random) -> list[str]:
    """Ten answers as ten annotators give them: mostly `truth`, some variants, now and then a wrong one.

    `truth` keeps a strict majority (at least 5 of 10, more than any other answer).
    """
    variants = WORDS[lang]["answer_variants"].get(truth, [])
    if truth.isdigit():  # "2" vs "two"; "0" vs "none"
        n = int(truth)
        variants = (
            ([EN["number"][n]] + (["none"] if n == 0 else []))
            if lang == "en"
            else [("没有" if n == 0 else ZH["number"][n] + "个")]
        )
    n_wrong = rng.choice((0, 0, 0, 0, 1, 1, 2)) if wrong_pool else 0
    n_variant = rng.choice((0, 0, 1, 2, 3)) if variants else 0
    answers = [truth] * (10 - n_wrong - n_variant)
    answers += [rng.choice(variants) for _ in range(n_variant)]
    answers += [rng.choice(wrong_pool) for _ in range(n_wrong)]
    rng.shuffle(answers)
    return answers


def _ref(o: dict, objects: list[dict], lang: str, *, by: str) -> str:
    """Name an object by its shape (or colour), adding its position when that alone is ambiguous."""
    w = WORDS[lang]
    same = [p for p in objects if p[by] == o[by]]
    word = w[by][o[by]][0]
    if lang == "en":
        noun = word if by == "shape" else f"{word} object"
        return noun + (" " + w["pos"][o["position"]][0] if len(same) > 1 else "")
    noun = word if by == "shape" else f"{word}的图形"
    return (w["pos"][o["position"]][0] + "的" if len(same) > 1 else "") + noun


def vqa_question(objects: list[dict], lang: str, rng: random.Random,
                 kind: str) -> tuple[str, str, str, str, list[str]]:
    """(question, truth, answer_type, question_type, wrong-answer pool) for one question kind."""
    w = WORDS[lang]
    o = rng.choice(objects)
    color, shape, pos = w["color"][o["color"]][0], w["shape"][o["shape"]][0], w["pos"][o["position"]][0]
    if kind == "color":
        pool = [v[0] for k, v in w["color"].items() if k != o["color"]]
        q = (
            f"what color is the {_ref(o, objects, lang, by='shape')}?"
            if lang == "en"
            else f"{_ref(o, objects, lang, by='shape')}是什么颜色的？"
        )
        return q, color, "other", "what color is the", pool
    if kind == "shape":
        pool = [v[0] for k, v in w["shape"].items() if k != o["shape"]]
        q = (
            f"what shape is the {_ref(o, objects, lang, by='color')}?"
            if lang == "en"
            else f"{_ref(o, objects, lang, by='color')}是什么形状？"
        )
        return q, shape, "other", "what shape is the", pool
    if kind == "count":
        which = rng.choice(("all", "color", "shape"))
        if which == "all":
            n, q = len(objects), ("how many shapes are there?" if lang == "en"
                                  else "图中有几个图形？")
        elif which == "color":
            c = rng.choice(list(COLORS))
            n = sum(p["color"] == c for p in objects)
            q = (f"how many {c} shapes are there?" if lang == "en"
                 else f"图中有几个{w['color'][c][0]}的图形？")
        else:
            s = rng.choice(SHAPES)
            n = sum(p["shape"] == s for p in objects)
            q = (f"how many {EN['plural'][s]} are there?" if lang == "en"
                 else f"图中有几个{w['shape'][s][0]}？")
        return q, str(n), "number", "how many", [str(k) for k in range(4) if k != n]
    if kind == "exists":
        if rng.random() < 0.5:
            c, s = o["color"], o["shape"]
        else:  # a pair not in the image that shares the colour or the shape of one that is: a hard "no"
            present = {(p["color"], p["shape"]) for p in objects}
            near = [(c, s) for c in COLORS for s in SHAPES if (c == o["color"]) != (s == o["shape"])]
            c, s = rng.choice([pair for pair in near if pair not in present])
        yes = (c, s) in {(p["color"], p["shape"]) for p in objects}
        if lang == "en":
            return (f"is there {_article(c)} {c} {s}?", "yes" if yes else "no", "yes/no", "is there a",
                    ["no" if yes else "yes"])
        truth = "有" if yes else "没有"
        return (f"图中有{w['color'][c][0]}的{w['shape'][s][0]}吗？", truth, "yes/no", "is there a",
                ["没有" if yes else "有"])
    if kind == "where":
        pool = [p for p in POSITIONS if p != o["position"]]
        if lang == "en":
            return f"where is the {color} {shape}?", o["position"], "other", "where is the", pool
        return (
            f"{color}的{shape}在哪里？",
            pos,
            "other",
            "where is the",
            [w["pos"][p][0] for p in POSITIONS if p != o["position"]],
        )
    # kind == "is_at": yes/no about the position
    asked = o["position"] if rng.random() < 0.5 else rng.choice([p for p in POSITIONS if p != o["position"]])
    yes = asked == o["position"]
    if lang == "en":
        return (
            f"is the {color} {shape} {w['pos'][asked][0]}?",
            "yes" if yes else "no",
            "yes/no",
            "is the",
            ["no" if yes else "yes"],
        )
    truth = "是" if yes else "不是"
    return (f"{color}的{shape}在{w['pos'][asked][0]}吗？", truth, "yes/no", "is the",
            ["不是" if yes else "是"])


VQA_KINDS = ("color", "shape", "count", "exists", "where", "is_at")


# --- instruct ----------------------------------------------------------------------------------------
def _describe(objects: list[dict], lang: str, rng: random.Random) -> str:
    if lang == "en":
        return ("The image shows "
                + _join_en([_noun_phrase(o, "en", rng, size=True, pos=True) for o in objects]) + ".")
    return "图中有" + _join_zh([_noun_phrase(o, "zh", rng, size=True, pos=True) for o in objects]) + "。"


def instruct_turn(objects: list[dict], lang: str, rng: random.Random, kind: str) -> tuple[str, str]:
    """One (human, gpt) exchange about the scene."""
    w = WORDS[lang]
    o = rng.choice(objects)
    color, shape = w["color"][o["color"]][0], w["shape"][o["shape"]][0]
    n = len(objects)
    en = lang == "en"
    if kind == "describe":
        q = rng.choice(
            ["Describe the image.", "What do you see in this picture?", "Describe this image briefly."]
            if en
            else ["描述一下这张图片。", "你在图中看到了什么？",
                  "简要描述这张图片。"]
        )
        return q, _describe(objects, lang, rng)
    if kind == "count":
        if en:
            return "How many shapes are in the image?", ("There is one shape." if n == 1
                                                         else f"There are {_count_en(n)} shapes.")
        return "图中有几个图形？", f"图中有{ZH['number'][n]}个图形。"
    if kind == "color":
        ref = _ref(o, objects, lang, by="shape")
        return ((f"What color is the {ref}?", f"The {ref} is {color}.") if en
                else (f"{ref}是什么颜色的？", f"{ref}是{color}的。"))
    if kind == "shape":
        ref = _ref(o, objects, lang, by="color")
        return (
            (f"What shape is the {ref}?", f"It is {_article(shape)} {shape}.") if en
            else (f"{ref}是什么形状？", f"它是{shape}。")
        )
    # kind == "where"
    pos = w["pos"][o["position"]][0]
    return (
        (f"Where is the {color} {shape}?", f"The {color} {shape} is {pos}.")
        if en
        else (f"{color}的{shape}在哪里？", f"{color}的{shape}在{pos}。")
    )


INSTRUCT_KINDS = ("describe", "count", "color", "shape", "where")


# --- records -----------------------------------------------------------------------------------------
def _records(
    task: str, index: int, objects: list[dict] | None, image: str | None, lang: str, seed: int,
    questions_per_image: int
) -> list[dict]:
    rng = random.Random(f"synth-text:{task}:{lang}:{seed}:{index}")
    truth = ([{k: o[k] for k in ("shape", "color", "size", "position", "bbox")} for o in objects]
             if objects else None)
    if task == "caption":
        return [{"id": f"synth-{index:06d}", "image": image, "captions": captions(objects, lang, rng),
                 "objects": truth}]
    if task == "retrieval":
        return [
            {
                "id": f"synth-{index:06d}",
                "image": image,
                "captions": captions(objects, lang, rng),
                "neg_captions": hard_negatives(objects, lang, rng),
                "objects": truth,
            }
        ]
    if task == "vqa":
        rows = []
        for j, kind in enumerate(rng.sample(VQA_KINDS, min(questions_per_image, len(VQA_KINDS)))):
            q, truth_answer, answer_type, question_type, pool = vqa_question(objects, lang, rng, kind)
            rows.append({
                "image": image, "image_id": index, "question_id": index * 100 + j, "question": q,
                "answers": annotator_answers(truth_answer, pool, lang, rng),
                "multiple_choice_answer": truth_answer, "answer_type": answer_type,
                "question_type": question_type, "objects": truth,
            })  # fmt: skip
        return rows
    # instruct
    if objects is None:
        pairs = rng.sample(TEXT_ONLY[lang], rng.choice((1, 2)))
        turns = [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        return [{"id": f"synth-{index:06d}", "conversations": turns}]
    kinds = rng.sample(INSTRUCT_KINDS, rng.choice((2, 3)))
    if "describe" in kinds and rng.random() < 0.7:  # conversations usually open with a description
        kinds.remove("describe")
        kinds.insert(0, "describe")
    turns = []
    for i, kind in enumerate(kinds):
        q, a = instruct_turn(objects, lang, rng, kind)
        turns += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q},
                  {"from": "gpt", "value": a}]
    return [{"id": f"synth-{index:06d}", "image": image, "conversations": turns, "objects": truth}]


def scene_texts(task: str, index: int, lang: str = "en", seed: int = 0,
                questions_per_image: int = 3) -> list[str]:
    """The texts `make_synthetic` writes for scene `index`, without drawing the image: captions, VQA
    question + answer, instruction turns. A text corpus for pre-training a language model."""
    objects = make_scene(seed, index)
    texts = []
    for r in _records(task, index, objects, None, lang, seed, questions_per_image):
        texts += r.get("captions", [])
        if "question" in r:
            texts.append(f"{r['question']} {r['multiple_choice_answer']}")
        texts += [t["value"].replace(IMAGE_TOKEN, "").strip() for t in r.get("conversations", [])]
    return texts


def hard_negatives(objects: list[dict], lang: str, rng: random.Random) -> list[str]:
    """Captions of the scene with one attribute changed: colour, shape and position of one object."""
    out = []
    for attr in ("color", "shape", "position"):
        changed = [dict(o) for o in objects]
        o = rng.choice(changed)
        if attr == "position":
            taken = {p["position"] for p in objects}
            o["position"] = rng.choice([p for p in POSITIONS if p not in taken])
        else:
            values = list(COLORS) if attr == "color" else list(SHAPES)
            o[attr] = rng.choice([v for v in values if v != o[attr]])
        # Keep reading order, as the positive captions do.
        changed.sort(key=lambda p: POSITIONS.index(p["position"]))
        out.append(canonical_caption(changed, lang))
    return out


def make_synthetic(
    task: str,
    n: int,
    out_dir: str | os.PathLike,
    lang: str = "en",
    seed: int = 0,
    image_size: int = 64,
    *,
    questions_per_image: int = 3,
    progress: bool = True,
) -> Path:
    """Write `n` images to out_dir/images and their records to out_dir/<task>.jsonl; return the JSONL path.

    `n` counts images; VQA writes `questions_per_image` records per image, and instruct writes `n`
    records of which about 5% are text-only (no image drawn for those).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    lang = synth_lang(lang)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (shapes must stay recognisable)")
    if not 1 <= questions_per_image <= len(VQA_KINDS):
        raise ValueError(f"questions_per_image must be between 1 and {len(VQA_KINDS)} (one question of each "
                         "kind)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    # Tasks share images (they depend on seed and size only); other settings would overwrite them
    # under the records of an earlier run.
    stamp, settings = out_dir / "images" / "synth.json", {"seed": seed, "image_size": image_size}
    if stamp.exists():
        try:
            made_with = json.loads(stamp.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            made_with = "unknown settings (its synth.json is unreadable)"
        if made_with != settings:
            raise ValueError(f"{out_dir}/images holds images made with {made_with}, not {settings}; use "
                             "another out_dir")
    atomic_write_text(stamp, json.dumps(settings))
    jsonl_path = out_dir / f"{task}.jsonl"
    with JsonlWriter(jsonl_path) as writer:
        for index in tqdm(range(n), desc=f"synth {task} ({lang})", unit=" img", disable=not progress):
            text_only = (task == "instruct"
                         and random.Random(f"synth-textonly:{seed}:{index}").random() < TEXT_ONLY_FRACTION)
            objects = image = None
            if not text_only:
                objects = make_scene(seed, index, image_size)
                image = f"images/{index:06d}.png"
                # PNG, not JPEG: lossless, so the stored pixels are exactly the drawn colours. Atomic, so
                # that an interrupted run never leaves a truncated image for the next one to reuse.
                with atomic_write(out_dir / image, "wb") as f:
                    draw_scene(objects, seed, index, image_size).save(f, format="PNG", compress_level=1)
            for record in _records(task, index, objects, image, lang, seed, questions_per_image):
                normalize_record(record, task)  # a generator bug should fail here, not in training
                writer.write(record)
    return jsonl_path


def synth_lang(lang: str) -> str:
    """`lang` as a key of `WORDS`, case-insensitive, a region or script subtag dropped (`zh-CN` -> `zh`).
    Raises `ValueError` naming the supported languages."""
    primary = str(lang).strip().lower().replace("_", "-").split("-")[0]
    primary = {"cmn": "zh", "zho": "zh", "eng": "en"}.get(primary, primary)
    if primary not in WORDS:
        raise ValueError(f"language {lang!r} is not supported; use one of {', '.join(sorted(WORDS))}")
    return primary


@user_errors
def main(argv: list[str]) -> int:
    """`python -m data_tools synth`: write the shapes data set; 2 on a user error."""
    p = argparse.ArgumentParser(prog="python -m data_tools synth",
                                description="Make the procedural shapes data set.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--n", type=int, required=True,
                   help="number of images (instruct: records, ~5%% text-only)")
    p.add_argument("--out-dir", required=True, help="writes OUT_DIR/images/*.png and OUT_DIR/<task>.jsonl")
    p.add_argument("--lang", default="en",
                   help=f"one of {', '.join(sorted(WORDS))} (zh-CN, zh-Hans, ... are zh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help=f"side in pixels (at least {MIN_IMAGE_SIZE})")
    p.add_argument("--questions-per-image", type=int, default=3, help="vqa only (at most 6)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    try:
        path = make_synthetic(
            args.task,
            args.n,
            args.out_dir,
            args.lang,
            args.seed,
            args.image_size,
            questions_per_image=args.questions_per_image,
            progress=args.progress,
        )
    except ValueError as e:  # make_synthetic's checks of the arguments
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
