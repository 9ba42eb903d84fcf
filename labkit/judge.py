"""MT-Bench style single-answer grading: a judge model scores a checkpoint's answers from 1 to 10.

The checkpoint answers each question through its own chat template (greedy `generate`, turn by
turn for multi-turn questions); a judge model behind any OpenAI-compatible chat endpoint (a local
vLLM or SGLang server, a hosted API) rates every answer and ends its verdict with `[[N]]`.
Scores land in `RUN_DIR/evals/STEP.json` as task `mtbench_judge`, metric `score`, beside the
lm-eval scores of the same step. Only the standard library speaks HTTP.

    df = judge("runs/my-run", "question.jsonl", "http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-72B-Instruct")
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from labkit.evaluate import resolve_target, write_results

TASK = "mtbench_judge"
JUDGE_SYSTEM = "You are a fair and careful judge of the answers an AI assistant gives."
_CRITERIA = (
    "Weigh how helpful, relevant, accurate and detailed it is, how deeply it treats the question, and "
    "where it fits, how creative it is. Write a short explanation of your assessment first, and stay "
    "objective. Then rate the answer from 1 (worst) to 10 (best), writing the rating in exactly this "
    'format: "[[rating]]", for example "Rating: [[6]]".'
)
JUDGE_PROMPT = (
    "[Instruction]\nJudge the quality of the answer an AI assistant gave to the user question below. "
    + _CRITERIA
    + "\n\n[Question]\n{question}\n\n[Start of the assistant's answer]\n{answer}\n[End of the assistant's answer]"
)
JUDGE_PROMPT_MULTI = (
    "[Instruction]\nBelow is a conversation between a user and an AI assistant. Judge the quality of the "
    "assistant's answer to the user's LAST question only; the earlier turns are context. "
    + _CRITERIA
    + "\n\n[Start of the conversation]\n{conversation}\n[End of the conversation]"
)
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+(?:\.\d+)?)\]")


class JudgeError(RuntimeError):
    """Bad questions or answers, or a judge endpoint that cannot be used."""


# -- questions and answers ---------------------------------------------------------------------


def load_questions(questions: str | Path | list) -> list[dict[str, Any]]:
    """Questions as `{question_id, category, turns}` dicts (MT-Bench's question.jsonl format).

    Accepts a JSONL file of such records (or with a `question` field), a list of strings, or a
    list of dicts with `turns` or `question`.
    """
    if isinstance(questions, (str, Path)):
        path = Path(questions).expanduser()
        if not path.is_file():
            raise JudgeError(f"{path}: no such questions file")
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise JudgeError(f"{path}:{i}: not valid JSON: {e}") from None
        where = str(path)
    else:
        records, where = list(questions), "questions"
    out = []
    for i, q in enumerate(records):
        if isinstance(q, str):
            q = {"turns": [q]}
        turns = q.get("turns") if isinstance(q, dict) else None
        if isinstance(q, dict) and turns is None and isinstance(q.get("question"), str):
            turns = [q["question"]]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise JudgeError(f"{where}[{i}]: a question needs 'turns' (a list of strings) or 'question' (a string)")
        out.append({"question_id": q.get("question_id", i), "category": q.get("category"), "turns": turns})
    if not out:
        raise JudgeError(f"{where}: no questions")
    return out


def generate_answers(checkpoint: str | Path, questions: list[dict[str, Any]], max_new_tokens: int = 512,
                     device: str | None = None) -> list[dict[str, Any]]:
    """Each question answered greedily by the checkpoint, turn by turn, through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    if not tok.chat_template:
        raise JudgeError(f"{checkpoint}: the tokenizer has no chat template; judge chat models only")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").to(device).eval()
    out = []
    for q in questions:
        messages, answers = [], []
        for turn in q["turns"]:
            messages.append({"role": "user", "content": turn})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already holds any BOS token, as in training.
            enc = tok(text, add_special_tokens=False, return_tensors="pt").to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            answer = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": answer})
            answers.append(answer)
        out.append({**q, "answers": answers})
    return out


def _answers(records: Any) -> list[dict[str, Any]]:
    if hasattr(records, "to_dict"):  # a DataFrame
        records = records.to_dict("records")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise JudgeError(f"answers[{i}]: expected a dict, got {type(r).__name__}")
        turns, answers = r.get("turns"), r.get("answers")
        if turns is None and "question" in r:
            turns = [r["question"]]
        if answers is None and "answer" in r:
            answers = [r["answer"]]
        if not isinstance(turns, list) or not isinstance(answers, list) or len(turns) != len(answers) or not turns:
            raise JudgeError(f"answers[{i}]: needs 'question' and 'answer', or 'turns' and 'answers' of equal length")
        out.append({"question_id": r.get("question_id", i), "category": r.get("category"),
                    "turns": [str(t) for t in turns], "answers": [str(a) for a in answers]})
    if not out:
        raise JudgeError("no answers to judge")
    return out


# -- the judge ---------------------------------------------------------------------------------


def judge_prompt(turns: list[str], answers: list[str]) -> str:
    """The grading prompt for the last answer of a conversation."""
    if len(turns) == 1:
        return JUDGE_PROMPT.format(question=turns[0], answer=answers[0])
    conversation = "\n\n".join(f"### User:\n{t}\n\n### Assistant:\n{a}" for t, a in zip(turns, answers))
    return JUDGE_PROMPT_MULTI.format(conversation=conversation)


def parse_score(judgment: str) -> float | None:
    """The `[[N]]` rating in a judgment (its last one), if it is within 1..10."""
    found = _RATING.findall(judgment) or _RATING_LOOSE.findall(judgment)
    if not found:
        return None
    score = float(found[-1])
    return score if 1 <= score <= 10 else None


def chat_url(endpoint_url: str) -> str:
    """`http://host:8000/v1` (a base URL, as OpenAI clients take it) or the full chat completions URL."""
    url = endpoint_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def chat_completion(endpoint_url: str, model: str, messages: list[dict[str, str]], api_key: str | None = None,
                    timeout: float = 120.0, retries: int = 3, **params: Any) -> str:
    """One OpenAI-style chat completion; the reply's text. Retries rate limits, 5xx and refused connections."""
    url = chat_url(endpoint_url)
    body = json.dumps({"model": model, "messages": messages, **params}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = json.loads(resp.read())
            return data["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            if (e.code not in (408, 429) and e.code < 500) or attempt == retries:
                raise JudgeError(f"judge endpoint {url} answered HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            if attempt == retries:
                raise JudgeError(f"could not reach the judge endpoint {url}: {e.reason}") from None
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge endpoint {url} did not answer like an OpenAI chat completion: {e!r}") from None
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def judge(
    source: str | Path | list | Any,
    questions: str | Path | list | None = None,
    endpoint_url: str = "http://127.0.0.1:8000/v1",
    model: str = "judge",
    api_key: str | None = None,
    *,
    max_new_tokens: int = 512,
    device: str | None = None,
    run_dir: str | Path | None = None,
    step: int | None = None,
    write: bool = True,
    workers: int = 4,
    timeout: float = 120.0,
    max_tokens: int = 2048,
):
    """Grade answers with a judge model; returns one row per judged turn.

    `source` is a run dir (its newest checkpoint), a checkpoint dir, or answers already generated
    (a list of dicts or a DataFrame with `question`/`answer` or `turns`/`answers`). For a run or a
    checkpoint inside one, the mean score is written to RUN_DIR/evals/STEP.json (`run_dir` names
    the run when answers are given). Columns: question_id, category, turn, question, answer,
    judgment, score (NaN where the judge gave no `[[N]]` rating). `df.attrs` holds the mean and path.
    """
    import pandas as pd

    target = None
    if isinstance(source, (str, Path)):
        if questions is None:
            raise JudgeError("questions are needed to judge a checkpoint")
        target = resolve_target(source, run_dir, step)
        answered = generate_answers(target.checkpoint, load_questions(questions), max_new_tokens, device)
    else:
        answered = _answers(source)

    jobs = [(a, k) for a in answered for k in range(len(a["turns"]))]

    def grade(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
        a, k = job
        prompt = judge_prompt(a["turns"][: k + 1], a["answers"][: k + 1])
        judgment = chat_completion(endpoint_url, model, [{"role": "system", "content": JUDGE_SYSTEM},
                                                         {"role": "user", "content": prompt}],
                                   api_key=api_key, timeout=timeout, temperature=0.0, max_tokens=max_tokens)
        score = parse_score(judgment)
        return {"question_id": a["question_id"], "category": a["category"], "turn": k + 1,
                "question": a["turns"][k], "answer": a["answers"][k], "judgment": judgment,
                "score": math.nan if score is None else score}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        df = pd.DataFrame(list(pool.map(grade, jobs)))
    scores = df["score"].dropna()
    if scores.empty:
        raise JudgeError(f"the judge gave no [[rating]] in any of {len(df)} judgments; first one: "
                         f"{df['judgment'].iloc[0][:300]!r}")
    df.attrs["score"] = float(scores.mean())
    df.attrs["rated"] = len(scores)
    rows = [{"task": TASK, "metric": "score", "value": float(scores.mean()), "stderr": _sem(scores)}]
    for turn, s in df.dropna(subset=["score"]).groupby("turn")["score"]:
        if df["turn"].max() > 1:
            rows.append({"task": TASK, "metric": f"score_turn{turn}", "value": float(s.mean()), "stderr": _sem(s)})
    df.attrs["rows"] = rows
    run = target.run_dir if target else (Path(run_dir).expanduser().resolve() if run_dir else None)
    if write and run is not None:
        if target:
            df.attrs["path"] = write_results(run, target.step, target.samples, target.checkpoint, rows)
        else:
            df.attrs["path"] = write_results(run, step or 0, None, None, rows)
    return df


def _sem(s) -> float | None:
    return float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else None
