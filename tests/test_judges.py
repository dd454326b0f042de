"""Judges: the exact shapes-world judge, the score parser, and the OpenAI-compatible HTTP judge against a stub server
started on 127.0.0.1 (good replies, scores in text, bad JSON, HTTP errors with retries, timeouts, refused
connections)."""
import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from vpo.online import Judge, JudgeError, JudgeRequest, OpenAIChatJudge, ShapesWorldJudge, parse_score
from vpo.worlds import shapes

GT = "a red circle and two blue squares."


# ---------------------------------------------------------------------------------------------- shapes world
@pytest.mark.parametrize("response, expected", [
    (GT, 10.0),
    ("two blue squares and a red circle.", 10.0),  # order does not matter
    ("a red circle, a green cross and two blue squares.", 7.5),  # one absent object: 3 / 4
    ("a green circle and two blue squares.", 5.0),  # wrong color: 2 / 4
    ("a red circle and three blue squares.", 7.5),  # count: 3 / 4
    ("a blue square.", 10 / 3),  # omissions: 1 / 3
    ("a circle and two blue squares.", 25 / 3),  # color left out: half credit, (2 + 0.5) / 3
    ("there is no red circle, just two blue squares.", 20 / 3),  # a negated mention is not a claim: 2 / 3
    ("the the on", 0.0),
    ("", 0.0),
])
def test_shapes_judge_hand_values(response, expected):
    assert ShapesWorldJudge.score_text(response, GT) == pytest.approx(expected)


def test_shapes_judge_ranks_truth_above_every_hallucination():
    judge = ShapesWorldJudge()
    assert isinstance(judge, Judge)
    for i in range(40):
        rng = np.random.default_rng(i)
        scene = shapes.random_scene(rng)
        pair = shapes.make_pair(scene, rng)
        reqs = [JudgeRequest(pair.prompt, r, pair.chosen) for r in
                (pair.chosen, shapes.describe(scene, "detailed"), pair.rejected)]
        scores = judge.score(reqs)
        assert scores[:2] == [10.0, 10.0], pair
        assert 0.0 <= scores[2] < 10.0, pair
        assert judge.score(reqs) == scores  # deterministic
        # The detailed caption works as the ground truth too.
        assert judge.score([JudgeRequest("q", pair.chosen, shapes.describe(scene, "detailed"))]) == [10.0]


def test_shapes_judge_yes_no_and_bad_ground_truth():
    judge = ShapesWorldJudge()
    q = "is there a red circle in the image?"
    got = judge.score([JudgeRequest(q, r, gt) for r, gt in
                       [("Yes, there is.", "yes"), ("no", "yes"), ("the", "no"), ("No.", "no")]])
    assert got == [10.0, 0.0, 0.0, 10.0]
    with pytest.raises(ValueError, match="must name the color"):
        judge.score([JudgeRequest("q", "a circle.", "a circle.")])
    with pytest.raises(ValueError, match="sequence of JudgeRequest"):
        judge.score(JudgeRequest("q", "a", "b"))


# ---------------------------------------------------------------------------------------------- score parsing
@pytest.mark.parametrize("text, expected", [
    ("Score: 7\n", 7.0),
    ("Score: [7]\n", 7.0),
    ("score = 7.5/10", 7.5),
    ("The response is mostly right. Score: 7/10", 7.0),
    ("Final score: 3. The response misses the cross.", 3.0),
    ('{"score": 4}', 4.0),
    ("8", 8.0),
    ("[9]", 9.0),
    ("10/10", 10.0),
    ("I'd give it 6/10.", 6.0),
    ("Score: 0", 0.0),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text, message", [
    ("A great answer.", "no score found"),
    ("Score: 12", r"outside \[0, 10\]"),
    ("Score: -1", r"outside \[0, 10\]"),
])
def test_parse_score_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_score(text)


# ------------------------------------------------------------------------------------------------ stub server
class _Stub:
    """An OpenAI-compatible stub: ``mode`` picks the reply; ``bodies`` / ``headers`` record the requests."""

    def __init__(self):
        self.mode = "marker"
        self.sleep = 0.0
        self.fail_first = 0
        self.bodies = []
        self.headers = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub.lock:
                    stub.bodies.append((self.path, json.loads(raw)))
                    stub.headers.append(dict(self.headers))
                    n = len(stub.bodies)
                if stub.sleep:
                    time.sleep(stub.sleep)
                if n <= stub.fail_first or stub.mode == "500":
                    return self._send(500, b'{"error": "boom"}')
                if stub.mode == "400":
                    return self._send(400, b'{"error": "unknown model"}')
                if stub.mode == "badjson":
                    return self._send(200, b"{this is not json")
                if stub.mode == "shape":
                    return self._send(200, b'{"result": "7"}')
                if stub.mode == "echo":  # a server that echoes the credentials back in its error body
                    return self._send(400, json.dumps({"error": f"bad key {self.headers.get('Authorization')}"})
                                      .encode())
                user = json.loads(raw)["messages"][-1]["content"]
                if stub.mode == "marker":  # "Score: N" for the response carrying <<N>>
                    content = "Score: %s\n" % re.search(r"<<(\d+)>>", user).group(1)
                else:
                    content = stub.mode  # the reply text itself
                body = {"id": "x", "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": "stop"}]}
                self._send(200, json.dumps(body).encode())

            def _send(self, code, payload):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.close()


def _judge(stub, **kw):
    kw = {"timeout": 2.0, "max_retries": 2, "retry_backoff": 0.01, **kw}
    return OpenAIChatJudge(stub.url, "judge-model", **kw)


def _req(i):
    return JudgeRequest("what is in the image?", f"answer <<{i}>>", "a red circle.")


def test_http_judge_scores_in_order(stub):
    judge = _judge(stub, api_key="k3y", max_workers=4, seed=11)
    assert isinstance(judge, Judge)
    assert judge.score([_req(i) for i in (3, 9, 0, 10, 7)]) == [3.0, 9.0, 0.0, 10.0, 7.0]
    assert len(stub.bodies) == 5
    path, body = stub.bodies[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0.1 and body["seed"] == 11
    user = body["messages"][-1]["content"]
    assert "what is in the image?" in user and "a red circle." in user and 'Score: [x]' in user
    assert stub.headers[0]["Authorization"] == "Bearer k3y"
    assert judge.score([]) == []


def test_http_judge_score_in_text(stub):
    stub.mode = "The response names the circle but misses the squares. Score: 7/10"
    # The full endpoint works as base_url too.
    judge = OpenAIChatJudge(stub.url + "/chat/completions", "judge-model", timeout=2.0)
    assert judge.score([_req(0)]) == [7.0]
    assert stub.bodies[0][0] == "/v1/chat/completions"


def test_http_judge_bad_json_is_a_clear_error(stub):
    stub.mode = "badjson"
    with pytest.raises(JudgeError, match=re.escape(stub.url + "/chat/completions") + ".*invalid JSON") as e:
        _judge(stub).score([_req(1)])
    assert isinstance(e.value, RuntimeError)
    assert len(stub.bodies) == 1  # not transient: no retry
    stub.mode = "shape"
    with pytest.raises(JudgeError, match=r"unexpected response: expected choices\[0\]\.message\.content"):
        _judge(stub).score([_req(1)])


def test_http_judge_unparsable_or_out_of_range_reply(stub):
    stub.mode = "Score: 11"
    with pytest.raises(JudgeError, match=r"outside \[0, 10\]"):
        _judge(stub).score([_req(1)])
    stub.mode = "I cannot judge this."
    with pytest.raises(JudgeError, match="no score found"):
        _judge(stub).score([_req(1)])


def test_http_judge_500_retries_then_fails(stub):
    stub.mode = "500"
    with pytest.raises(JudgeError, match=r"HTTP 500 .*after 3 attempts") as e:
        _judge(stub, max_retries=2).score([_req(1)])
    assert stub.url in str(e.value)
    assert len(stub.bodies) == 3


def test_http_judge_recovers_from_a_transient_500(stub):
    stub.fail_first = 1
    assert _judge(stub, max_retries=1).score([_req(6)]) == [6.0]
    assert len(stub.bodies) == 2


def test_http_judge_400_is_not_retried(stub):
    stub.mode = "400"
    with pytest.raises(JudgeError, match=r"HTTP 400 .*unknown model.*after 1 attempt$"):
        _judge(stub).score([_req(1)])
    assert len(stub.bodies) == 1


def test_http_judge_timeout_is_an_error_not_a_hang(stub):
    stub.sleep = 1.0
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match=r"no reply within timeout=0\.2s.*after 2 attempts"):
        _judge(stub, timeout=0.2, max_retries=1).score([_req(1)])
    assert time.perf_counter() - t0 < 1.5


def test_http_judge_unreachable_server():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIChatJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=1.0, max_retries=1, retry_backoff=0.01)
    with pytest.raises(JudgeError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: cannot reach the server"):
        judge.score([_req(1)])


def test_http_judge_nan_mode_keeps_going(stub):
    stub.mode = "500"
    with pytest.warns(RuntimeWarning, match="1 of 1 responses could not be scored"):
        (score,) = _judge(stub, errors="nan", max_retries=0).score([_req(1)])
    assert math.isnan(score)


def test_http_judge_argument_checks():
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAIChatJudge("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="prompt_template must be a str.format template"):
        OpenAIChatJudge("http://127.0.0.1:1/v1", "m", prompt_template="{question} {reference}")
    with pytest.raises(ValueError, match="errors must be one of"):
        OpenAIChatJudge("http://127.0.0.1:1/v1", "m", errors="ignore")


# ------------------------------------------------------------------------------------------------ API key
SECRET = "sk-vpo-test-0123456789abcdef"


def test_http_judge_api_key_from_the_environment_never_shown(stub, monkeypatch):
    import pickle

    monkeypatch.delenv("VPO_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    judge = _judge(stub, max_retries=0)
    assert judge.has_api_key and SECRET not in repr(judge) and SECRET not in str(vars(judge).get("api_key"))
    assert judge.score([_req(4)]) == [4.0]
    assert stub.headers[-1]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET.encode() not in pickle.dumps(judge)  # copies (DataLoader workers, checkpoints) do not carry it
    monkeypatch.setenv("VPO_JUDGE_API_KEY", "sk-vpo-named")  # the vpo-named variable wins
    _judge(stub).score([_req(1)])
    assert stub.headers[-1]["Authorization"] == "Bearer sk-vpo-named"
    monkeypatch.delenv("VPO_JUDGE_API_KEY")
    stub.mode = "echo"
    with pytest.raises(JudgeError) as e:
        _judge(stub, max_retries=0).score([_req(1)])
    assert SECRET not in str(e.value) and "<redacted>" in str(e.value)
    monkeypatch.delenv("OPENAI_API_KEY")
    stub.mode = "marker"
    _judge(stub).score([_req(2)])
    assert "Authorization" not in stub.headers[-1]
    with pytest.raises(ValueError, match="api_key"):
        _judge(stub, api_key="  ")


def test_online_run_with_http_judge_writes_no_key(stub, monkeypatch, tmp_path, capsys, caplog):
    """An online OViP run judged by the stub: the header arrives; the key is in nothing the run writes or prints."""
    from vpo.construct.csr import load_policy
    from vpo.data import PreferenceCollator
    from vpo.online import OViPOnlineDataset, ShapesNegativeGenerator, make_judge
    from vpo.trainer import VPOConfig, VPOTrainer
    from vpo.worlds import shapes

    monkeypatch.setenv("VPO_JUDGE_API_KEY", SECRET)
    shapes.make_dataset(str(tmp_path / "shapes"), 4, seed=0)
    data = str(tmp_path / "shapes" / "train.jsonl")
    model, processor = load_policy("tiny:llava")

    def sample_fn(prompts, images, *, k, seed, keys):  # the stub scores <<N>> as N: one clear pair per prompt
        return [["a red circle <<9>>", "a red circle <<9>>", "nothing <<1>>", "nothing <<1>>"] for _ in prompts]

    out = tmp_path / "run"
    args = VPOConfig(output_dir=str(out), method="ovip", online=True, data_path=data, max_steps=1,
                     per_device_train_batch_size=2, use_cpu=True, report_to="none", lora_r=4, lora_dropout=0.0,
                     logging_steps=1, save_strategy="no", disable_tqdm=True, online_judge="http",
                     online_judge_url=stub.url, online_judge_model="judge-model")
    judge = make_judge("http", url=stub.url, model="judge-model")
    ds = OViPOnlineDataset(data, processor, judge=judge, negatives=ShapesNegativeGenerator(), buffer_size=2,
                           prompts_per_step=2, sample_fn=sample_fn, k=4)
    trainer = VPOTrainer(model, args, train_dataset=ds,
                         data_collator=PreferenceCollator(processor, "llava", method="ovip"))
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    assert stub.headers and all(h["Authorization"] == f"Bearer {SECRET}" for h in stub.headers)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in written) and any(p.name == "training_args.bin" for p in written)
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    assert SECRET not in repr(args.to_dict())
