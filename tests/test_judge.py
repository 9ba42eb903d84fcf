"""labkit.judge against a small OpenAI-compatible server started by the test on 127.0.0.1."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labkit.judge import JudgeError, chat_completion, judge, parse_score


class Endpoint:
    """A fake judge: records every request and answers with `reply` (or `status` and an error body)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply, self.status = "The answer is short but correct. Rating: [[7]]", 200
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if endpoint.status != 200:
                    out = json.dumps({"error": {"message": "bad model"}}).encode()
                else:
                    out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
                        {"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": endpoint.reply}}]}).encode()
                self.send_response(endpoint.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint():
    ep = Endpoint()
    yield ep
    ep.server.shutdown()
    ep.server.server_close()


QUESTIONS = [
    {"question_id": 81, "category": "skills", "turns": ["Reverse the word: quartz"]},
    {"question_id": 82, "category": "math", "turns": ["What is 72 + 49?", "Now add 10 to that."]},
]


def test_judge_answers_with_the_checkpoint_and_records_the_judges_ratings(endpoint, tiny_dir, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 3, "samples": 48}))

    df = judge(tmp_path / "run", QUESTIONS, endpoint.url, "judge-model", api_key="sk-test", max_new_tokens=8)

    assert list(df["turn"]) == [1, 1, 2] and list(df["question_id"]) == [81, 82, 82]
    assert list(df["score"]) == [7.0, 7.0, 7.0]
    assert len(endpoint.requests) == 3
    for req in endpoint.requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["Authorization"] == "Bearer sk-test"
        assert req["headers"]["Content-Type"] == "application/json"
        body = req["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert '"[[rating]]"' in body["messages"][1]["content"]
    prompts = {r["body"]["messages"][1]["content"] for r in endpoint.requests}
    first = df.iloc[0]
    assert any("Reverse the word: quartz" in p and f"[Start of the assistant's answer]\n{first.answer}\n" in p
               for p in prompts)
    second_turn = df.iloc[2]
    multi = [p for p in prompts if "Now add 10 to that." in p]
    assert len(multi) == 1 and "What is 72 + 49?" in multi[0] and df.iloc[1].answer in multi[0]
    assert second_turn.answer in multi[0] and "LAST question" in multi[0]

    data = json.loads((tmp_path / "run" / "evals" / "3.json").read_text())
    assert (data["run"], data["step"], data["samples"]) == ("run", 3, 48)
    assert {(r["task"], r["metric"]): r["value"] for r in data["results"]} == {
        ("mtbench_judge", "score"): 7.0, ("mtbench_judge", "score_turn1"): 7.0, ("mtbench_judge", "score_turn2"): 7.0}
    assert df.attrs["path"] == tmp_path / "run" / "evals" / "3.json"


def test_given_answers_need_no_model_and_a_missing_rating_is_an_error(endpoint, tmp_path):
    answers = [{"question": "What is 2 + 2?", "answer": "4"}]
    df = judge(answers, None, endpoint.url, "m", run_dir=tmp_path / "r", step=9)
    assert df.attrs["score"] == 7.0 and "Authorization" not in endpoint.requests[0]["headers"]
    assert json.loads((tmp_path / "r" / "evals" / "9.json").read_text())["results"][0]["value"] == 7.0
    endpoint.reply = "I cannot decide."
    with pytest.raises(JudgeError, match=r"no \[\[rating\]\] in any of 1 judgments.*I cannot decide"):
        judge(answers, None, endpoint.url, "m")


def test_http_errors_and_unreachable_endpoints_are_reported(endpoint):
    endpoint.status = 400
    with pytest.raises(JudgeError, match=r"HTTP 400: .*bad model"):
        chat_completion(endpoint.url, "m", [{"role": "user", "content": "hi"}])
    assert len(endpoint.requests) == 1  # a client error is not retried
    port = endpoint.server.server_address[1]
    endpoint.server.shutdown()
    endpoint.server.server_close()
    with pytest.raises(JudgeError, match="could not reach the judge endpoint"):
        chat_completion(f"http://127.0.0.1:{port}/v1", "m", [{"role": "user", "content": "hi"}], retries=0)


def test_rating_parsing():
    assert parse_score("Fine answer. Rating: [[8]]") == 8.0
    assert parse_score("[[7.5]]") == 7.5
    assert parse_score("Rating: [6]") == 6.0  # judges sometimes drop a bracket
    assert parse_score("The example says [[5]]; my rating: [[3]]") == 3.0
    assert parse_score("no rating here") is None
    assert parse_score("[[11]]") is None
