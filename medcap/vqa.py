"""Helpers of the VQA recipe: questions from a VQA data set, the prompts of the direct and two-stage modes, and
likelihood scoring of the options.

Likelihood scoring: each option, written as ``option_format`` ("{text}" or "{letter}. {text}"), is scored as
the assistant's answer after the prompt: the sum of its tokens' log-probabilities (with the end-of-turn token
when ``with_end``), or their mean. ``sum`` favours short options (every token costs probability); ``mean``
removes most of that length bias but lets a long option win on a few near-certain continuation tokens.

All options of a question, and of the other questions about the same image, go through the model in one row:
a prefix tree of the prompt + option sequences, where each shared prefix (the prompt, the image placeholders)
is stored once. An attention mask lets each token see only its own sequence's earlier tokens, and positions
are positions within the sequence, so every option is scored exactly as if it followed its prompt alone, while
the image is encoded once per row and a shared prefix computed once.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medcap.data.vqa_formats import question_prompt
from medcap.metrics.vqa import answer_key

NORMALIZE = ("mean", "sum")


def vqa_questions(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The questions of a VQA data set's samples (``format: omnimedvqa`` or ``vqa_rad``): id, images, question,
    options ({letter: text} or None), answer, modality, question_type. ValueError, naming the sample and the
    field, for a sample without a question or an answer (e.g. a plain caption manifest) or whose answer names none
    of its options."""
    questions = []
    for s in samples:
        for field in ("question", "answer"):
            if not isinstance(s.get(field), str) or not s[field].strip():
                raise ValueError(f"{s['source']}: sample {s['id']!r}: field {field!r} is missing or empty; "
                                 f"the VQA recipe needs a VQA data set (format: omnimedvqa or vqa_rad)")
        if s.get("options") and answer_key(s["answer"], s["options"]) is None:
            raise ValueError(f"{s['source']}: sample {s['id']!r}: field 'answer' ({s['answer']!r}) names none of the "
                             f"options {s['options']}")
        questions.append({"id": s["id"], "source": s["source"], "images": s["images"],
                          "image_field": s.get("image_field", "image"), "question": s["question"],
                          "options": s.get("options") or None, "answer": s["answer"],
                          "modality": s.get("modality"), "question_type": s.get("question_type")})
    return questions


def correct_option(answer: str, options: dict[str, str] | None) -> str | None:
    """The key of the right option (``medcap.metrics.vqa.answer_key``: what scoring counts as right); None for a
    question without options or an answer that names no option."""
    return answer_key(answer, options) if options else None


def question_text(question: dict[str, Any], instruction: str | None = None,
                  closed_instruction: str | None = None) -> str:
    """The question, one ``A. text`` line per option, then the instruction (``closed_instruction`` for a
    question without options), if any."""
    extra = instruction if question["options"] else closed_instruction
    text = question_prompt(question["question"], question["options"])
    return f"{text}\n{extra.strip()}" if extra and extra.strip() else text


def answer_prompt(tokenizer, text: str, num_image_tokens: int, system: str | None = None,
                  describe_prompt: str | None = None, description: str | None = None) -> list[int]:
    """The prompt ids up to the assistant header of the answer. Direct: one user turn with the image and
    ``text``. Two-stage (``description`` given): the first turn asks ``describe_prompt`` about the image and is
    answered with ``description``; ``text`` is the second user turn of the same conversation."""
    if description is None:
        return tokenizer.prompt_ids(text, num_image_tokens, system)
    if not describe_prompt:
        raise ValueError("the two-stage prompt needs describe_prompt")
    return (tokenizer.prompt_ids(describe_prompt, num_image_tokens, system) + tokenizer.answer_ids(description)
            + tokenizer.followup_ids(text))


def option_ids(tokenizer, options: dict[str, str], option_format: str = "{text}",
               with_end: bool = True) -> list[list[int]]:
    """Each option's answer tokens, in the order of ``options``: ``answer_ids`` of the formatted option, without
    its end-of-turn token unless ``with_end``."""
    out = []
    for letter, text in options.items():
        ids = tokenizer.answer_ids(option_format.format(letter=letter, text=text))
        ids = ids if with_end else ids[:-1]
        if not ids:
            raise ValueError(f"option {letter} ({text!r}) gives no tokens to score with option_format "
                             f"{option_format!r}")
        out.append(ids)
    return out


def pack_tree(sequences: list[list[int]]) -> dict[str, Any]:
    """Token sequences packed into one row as a prefix tree: a prefix the sequences share is stored once.
    ``tokens`` [S], ``parents`` (the node before each node, -1 at a root), ``positions`` [S] (each node's depth,
    i.e. its position in its own sequence), ``mask`` [S, S] (True where a node may attend: to itself and its
    ancestors, which is the causal mask of its own sequence) and ``paths``: each sequence's node indices."""
    nodes: dict[tuple[int, int], int] = {}
    tokens, parents, depth, paths = [], [], [], []
    for seq in sequences:
        if not seq:
            raise ValueError("every sequence needs at least one token")
        node, path = -1, []
        for token in seq:
            if (node, token) not in nodes:
                nodes[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
                depth.append(depth[node] + 1 if node >= 0 else 0)
            node = nodes[node, token]
            path.append(node)
        paths.append(path)
    size = len(tokens)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i, parent in enumerate(parents):  # a parent always comes before its children
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return {"tokens": torch.tensor(tokens), "parents": parents, "positions": torch.tensor(depth), "mask": mask,
            "paths": paths}


@torch.inference_mode()
def score_options(model, prompts: list[list[int]], continuations: list[list[list[int]]], images: Tensor | None,
                  pad_id: int, rows: list[list[int]] | None = None, max_seq_len: int | None = None,
                  ids: list[str] | None = None) -> list[list[tuple[float, int]]]:
    """(sum of log-probabilities, token count) of every continuation of every prompt, all in one forward pass.

    ``rows`` lists the prompts packed into each row (default: one row per prompt); the prompts of a row must
    share their images (their image placeholders sit in a prefix they share, e.g. several questions about one
    image). Each row is a prefix tree (``pack_tree``) of prompt + continuation for all its prompts and
    continuations, so the image is encoded and a shared prefix computed once. ``images``: each row's images,
    row after row. ``max_seq_len``: the decoder's limit on a row's length (ValueError naming the question, from
    ``ids``, when a row exceeds it)."""
    rows = rows if rows is not None else [[i] for i in range(len(prompts))]
    packs = []
    for row in rows:
        sequences = [prompts[i] + c for i in row for c in continuations[i]]
        pack = pack_tree(sequences)
        if max_seq_len is not None and len(pack["tokens"]) > max_seq_len:
            name = ", ".join(repr(ids[i]) for i in row) if ids else f"prompt(s) {row}"
            raise ValueError(f"question(s) {name}: the prompt(s) and all options take {len(pack['tokens'])} tokens in "
                             f"one row, more than the model's max_seq_len={max_seq_len}; raise model.max_seq_len or "
                             f"pack fewer questions per row")
        image_id = getattr(model, "image_token_id", None)
        if image_id is not None:
            placeholders = {prompts[i].count(image_id) for i in row}
            if len(placeholders) > 1 or int((pack["tokens"] == image_id).sum()) != placeholders.pop():
                raise ValueError(f"prompts {row} are packed into one row but do not share their image placeholders "
                                 f"(only questions about the same image(s), with the same text before the image, "
                                 f"may share a row)")
        packs.append(pack)
    length = max(len(pk["tokens"]) for pk in packs)
    device = next(model.parameters()).device
    tokens = torch.full((len(packs), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(packs), length), dtype=torch.long)
    # padding attends to itself only, so that no attention row is empty
    mask = torch.eye(length, dtype=torch.bool).repeat(len(packs), 1, 1)
    for r, pk in enumerate(packs):
        n = len(pk["tokens"])
        tokens[r, :n], positions[r, :n], mask[r, :n, :n] = pk["tokens"], pk["positions"], pk["mask"]
    encoder_input = None
    if images is not None:
        encoder_input = {"image": {"images": images.to(device, next(model.vision.parameters()).dtype)}}
    # each option token is predicted at the node before it in its own sequence (its parent in the tree): only
    # those positions are projected to the vocabulary
    lookups = []
    needed = torch.zeros((len(packs), length), dtype=torch.bool)
    for r, (row, pk) in enumerate(zip(rows, packs)):
        paths = iter(pk["paths"])
        for i in row:
            for _ in continuations[i]:
                nodes = torch.tensor(next(paths)[len(prompts[i]):])
                before = torch.tensor([pk["parents"][n] for n in nodes.tolist()])
                needed[r, before] = True
                lookups.append((i, r, before, pk["tokens"][nodes]))
    logits = model(tokens.to(device), mask=mask.to(device), input_pos=positions.to(device),
                   encoder_input=encoder_input, output_at=needed.to(device))
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    index = torch.full(needed.shape, -1, dtype=torch.long)
    index[needed] = torch.arange(int(needed.sum()))
    out: list[list[tuple[float, int]]] = [[] for _ in prompts]
    for i, r, before, targets in lookups:
        out[i].append((float(logprobs[index[r, before], targets].sum()), len(targets)))
    return out


def pick_option(scores: list[tuple[float, int]], normalize: str = "mean") -> int:
    """The index of the best option by summed (``sum``) or per-token (``mean``) log-probability; the first of
    equal scores."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    values = [total if normalize == "sum" else total / n for total, n in scores]
    return max(range(len(values)), key=lambda i: (values[i], -i))


# --- two_stage_judge: the medcap seed's protocol -------------------------------------------------------------------

JUDGE_INSTRUCTION = ("Based on the question and our answer, respond with only the letter of the correct option from "
                     "the given choices.")
JUDGE_MISSING = ("omit", "nan")
SEED_LETTERS = "ABCD"
# what pandas.read_csv reads as NaN by default (its STR_NA_VALUES): the seed read its answers back through it
PANDAS_NA_TEXTS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                             "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def judge_text(question: str, answer: str, options: dict[str, str], missing: str = "omit") -> str:
    """The medcap seed's judge prompt: the question, the model's free answer, the options A to D (A and B alone when
    there is neither C nor D; an empty text after a missing letter's ``D. ``, as its code printed them), the
    instruction. With ``missing="nan"`` it is the prompt the seed's run actually built: it read its answers back
    from a CSV with pandas, so an empty cell (option C and D of a two-option question, an empty answer) or a text
    pandas takes for a missing value ("None", "NA", "null"...) came back as NaN and was printed ``nan``, and every
    question showed options A to D. Options under other keys are printed as they are, in their order."""
    if missing not in JUDGE_MISSING:
        raise ValueError(f"judge_missing must be one of {JUDGE_MISSING}, got {missing!r}")
    if missing == "nan":
        options = {letter: "nan" if options.get(letter, "") in PANDAS_NA_TEXTS else options[letter]
                   for letter in SEED_LETTERS}
        answer = "nan" if answer in PANDAS_NA_TEXTS else answer
    elif set(options) <= set(SEED_LETTERS):
        letters = SEED_LETTERS if set(options) - {"A", "B"} else "AB"
        options = {letter: options.get(letter, "") for letter in letters}
    lines = [f"Question: {question.strip()}", f"Our answer: {answer}"]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines) + "\n\n" + JUDGE_INSTRUCTION


def judge_letter(reply: str) -> str:
    """The seed's reading of the judge's reply: its first character after stripping, upper-cased ('' if none)."""
    return reply.strip()[:1].upper()


def judged_option(reply: str, options: dict[str, str]) -> str:
    """The option key the judge's reply starts with, or '' (wrong, as the seed counted any other reply): never
    matched against the options' texts, so "I think..." is not option "I"'s text."""
    letter = judge_letter(reply)
    return letter if letter in options else ""


def description_budget(max_new_tokens: int, context_len: int | None, prompt_len: int, question_len: int,
                       spare: int = 5) -> int:
    """How many tokens the image description may take: ``min(max_new_tokens, context_len - prompt_len -
    question_len - spare)`` (the seed: min(200, 500 - prompt - question - 5), so that the second turn still fits
    its 500-token context); ``max_new_tokens`` without a ``context_len``."""
    if context_len is None:
        return max_new_tokens
    return min(max_new_tokens, context_len - prompt_len - question_len - spare)
