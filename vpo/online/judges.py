"""Judges for OViP's online loop: ``G_r(A, A*) ∈ [0, 10]``, the score of a response ``A`` given the reference ``A*``.

A judge is any object with ``score(requests) -> list of floats`` (:class:`Judge`); a request
(:class:`JudgeRequest`) carries the prompt, the response, the ground truth ``A*`` and an optional ``context`` (the
source row, a scene, ...). Scores lie in ``[0, 10]``: 10 = a perfect response, 0 = totally wrong (paper 002, App. A).
A judge may return ``nan`` for a response it could not score (the online step then leaves that response out).

Built-ins:

- :class:`ShapesWorldJudge`: exact, from the shapes world's ground truth (:mod:`vpo.worlds.shapes`). A caption is
  scored by the multiset Jaccard index of its object instances against the ground truth's,
  ``10 · |S ∩ T| / |S ∪ T|``; a yes/no answer by agreement. Details in the class.
- :class:`OpenAIChatJudge`: an HTTP client (standard library only) for an OpenAI-compatible chat-completions endpoint
  (a local vLLM / TGI / llama.cpp server). It sends the paper's judging prompt (Table 9, :data:`PAPER_JUDGE_PROMPT`)
  and parses the score out of the reply (:func:`parse_score`). Timeouts, retries with backoff, and a
  :class:`JudgeError` naming the endpoint for every failure (HTTP error, unreachable server, invalid JSON, an
  unexpected response shape, a reply with no score or a score outside ``[0, 10]``).

Example:
    >>> from vpo.online import JudgeRequest, ShapesWorldJudge
    >>> judge = ShapesWorldJudge()
    >>> gt = "a red circle and two blue squares."
    >>> judge.score([JudgeRequest("describe the image.", r, gt) for r in
    ...              [gt, "a red circle, a green cross and two blue squares.", "a green circle."]])
    [10.0, 7.5, 0.0]
"""
from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

from vpo._validate import check_choice, check_positive, check_range

SCORE_MIN, SCORE_MAX = 0.0, 10.0


@dataclass(frozen=True)
class JudgeRequest:
    """One response to score.

    Attributes:
        prompt: the question ``Q``.
        response: the sampled response ``A``.
        ground_truth: the reference answer ``A*``.
        context: anything else the judge may use (the source row, a scene); the built-ins ignore it.
    """

    prompt: str
    response: str
    ground_truth: str
    context: Any = None


class JudgeError(RuntimeError):
    """A judge could not score a response (the message names the endpoint and the reason)."""


@runtime_checkable
class Judge(Protocol):
    """``score(requests) -> [float]``: one score in ``[0, 10]`` (or ``nan``) per request, in order."""

    def score(self, requests: Sequence[JudgeRequest]) -> List[float]:
        ...


# ------------------------------------------------------------------------------------------------ the shapes world
class ShapesWorldJudge:
    """The exact judge of the shapes world (:mod:`vpo.worlds.shapes`): scores from the ground-truth text alone.

    - Yes/no questions (the ground truth is ``"yes"`` or ``"no"``): 10 if the response's first ``yes``/``no`` word
      (:func:`vpo.eval.metrics.parse_yes_no`) equals it, else 0.
    - Captions (the ground truth is a caption of either style, e.g. :func:`~vpo.worlds.shapes.describe`): both texts
      are read with :func:`~vpo.worlds.shapes.parse_description` into object instances keyed by (color, shape), with
      multiplicity (``"two blue squares"`` = 2 instances; a count-less plural = 1). ``T`` = the ground truth's,
      ``S`` = the response's. ``m = Σ_(c,s) min(S[c,s], T[c,s])``; then each color-less mention (``"a circle"``)
      matches up to its count among the ground-truth instances of its shape still unmatched (``m_b`` of them). The
      score is ``10 · (m + m_b / 2) / (|S| + |T| − m − m_b)``: the multiset Jaccard index, with half credit for a
      match that leaves the color out (10 when both are empty). Sizes and positions are not scored.

    So the ground-truth caption scores 10, each hallucinated or missing instance lowers the score, and a response
    with no object mention scores 0. For ``T`` = {red circle, 2 blue squares}: an extra green cross 3/4 → 7.5; the
    circle called green 2/4 → 5.0; "three blue squares" 3/4 → 7.5; "a blue square" 1/3 → 3.33.
    """

    def score(self, requests: Sequence[JudgeRequest]) -> List[float]:
        return [self.score_text(r.response, r.ground_truth) for r in _check_requests(requests)]

    @staticmethod
    def score_text(response: str, ground_truth: str) -> float:
        """The score of ``response`` against ``ground_truth`` (class docstring)."""
        from vpo.eval.metrics import parse_yes_no
        from vpo.worlds.shapes import parse_description

        gt = ground_truth.strip().lower().rstrip(".!")
        if gt in ("yes", "no"):
            return SCORE_MAX if parse_yes_no(response) == gt else SCORE_MIN
        truth: Counter = Counter()
        for m in parse_description(ground_truth):
            if m.color is None:
                raise ValueError(f"ground_truth must name the color of every object (a shapes caption), got "
                                 f"{ground_truth!r}")
            truth[(m.color, m.shape)] += 1 if m.count is None else m.count
        said: Counter = Counter()
        bare: Counter = Counter()
        for m in parse_description(response):
            n = 1 if m.count is None else m.count
            if m.color is None:
                bare[m.shape] += n
            else:
                said[(m.color, m.shape)] += n
        matched = sum(min(n, truth[key]) for key, n in said.items())
        left: Counter = Counter()
        for (color, shape), n in truth.items():
            left[shape] += n - min(n, said[(color, shape)])
        matched_bare = sum(min(n, left[shape]) for shape, n in bare.items())
        union = sum(said.values()) + sum(bare.values()) + sum(truth.values()) - matched - matched_bare
        return SCORE_MAX if union == 0 else SCORE_MAX * (matched + 0.5 * matched_bare) / union


# ------------------------------------------------------------------------------------------------------ HTTP judge
# Paper 002, Table 9 ("Prompt for Quality Judgment"), verbatim up to whitespace.
PAPER_JUDGE_PROMPT = """# Task
Your role is as a discerning assistant tasked with evaluating model responses for multimodal tasks (though you have \
no access with the image). Upon being presented with a question that requires the interpretation of both text and \
images, you will receive two distinct responses. The first is crafted by our sophisticated multimodal model, while \
the second represents an approximate ideal answer—it may be incomplete. Your objective is to meticulously and \
precisely assess the model-generated response (the former) based on the provided reference answer (the latter).

- Here's how you should approach the assessment process:
1. The quality of the response depends on its accuracy and the degree of adherence to the correct answer. Therefore, \
if the response is much more detailed than the reference answer, it should not be considered a very good response \
(although it may still be considered a good one).
2. Directly provide the score of the response, with a full score of 10. Your response should follow this format: \
"Score: [x]\\n", where "[x]" represents the score you give, and "\\n" is a line break.
3. Please do not provide additional reasoning, just give the score directly.

# Question
{question}

# Response
{response}

# Correct answer
{answer}
"""

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCORE_LABEL = re.compile(r"score\W{0,5}?(" + _NUM + ")", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^\s*\[?\s*(" + _NUM + r")\s*\]?\s*(?:/\s*10)?\s*\.?\s*$")
_OUT_OF_TEN = re.compile(r"(" + _NUM + r")\s*/\s*10(?!\.?\d)")


def parse_score(text: str) -> float:
    """The score in a judge's reply. Tried in order, the first that matches wins:

    1. a JSON object with a numeric ``"score"`` (``{"score": 7}``);
    2. the first number after the word "score" (case-insensitive, up to 5 non-word characters between):
       ``"Score: 7"``, ``"Score: [7]"``, ``"score = 7.5/10"``, ``"Final score: 8"``;
    3. the whole reply is one number, optionally in brackets and/or followed by ``/10``: ``"7"``, ``"[7]"``,
       ``"7/10"``;
    4. the first ``N/10`` anywhere: ``"I'd give it 6/10."``.

    Raises:
        ValueError: no score found, or the score is outside ``[0, 10]`` (or not finite).
    """
    if not isinstance(text, str):
        raise ValueError(f"a judge reply must be a string, got {type(text).__name__}")
    value: Optional[float] = None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("score"), (int, float)) and not isinstance(obj["score"], bool):
            value = float(obj["score"])
    if value is None:
        for pattern, target in ((_SCORE_LABEL, text), (_BARE_NUMBER, stripped), (_OUT_OF_TEN, text)):
            m = pattern.search(target)
            if m:
                value = float(m.group(1))
                break
    if value is None:
        raise ValueError(f"no score found in the judge's reply {_snippet(text)}")
    if not math.isfinite(value) or not SCORE_MIN <= value <= SCORE_MAX:
        raise ValueError(f"the judge's score {value:g} is outside [0, 10] (reply {_snippet(text)})")
    return value


def _snippet(text: Any, n: int = 200) -> str:
    s = text if isinstance(text, str) else repr(text)
    return repr(s if len(s) <= n else s[: n - 3] + "...")


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class OpenAIChatJudge:
    """Score responses with an LLM behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, ...).

    Each request becomes one chat completion: a user message ``prompt_template.format(question=Q, response=A,
    answer=A*)`` (default: the paper's Table 9 prompt), optionally after a system message; the reply's
    ``choices[0].message.content`` goes through :func:`parse_score`. Requests run concurrently on ``max_workers``
    threads; scores come back in request order.

    Args:
        base_url: the server's API root (``http://127.0.0.1:8000/v1``) or the full endpoint
            (``.../v1/chat/completions``).
        model: the served model's name (the request's ``"model"``).
        api_key: sent as ``Authorization: Bearer <api_key>``. Default: the environment's ``VPO_JUDGE_API_KEY``, else
            ``OPENAI_API_KEY`` (:data:`API_KEY_ENV`); none: no header. The key never appears in ``repr``, in error
            messages (a server echoing it back is redacted) or in anything vpo writes: keep it in the environment,
            not in a configuration file (``VPOConfig`` has no field for it).
        timeout: seconds allowed for connecting and for each read of the reply (urllib's socket timeout).
        max_retries: extra attempts after a timeout, a connection error or HTTP 408/429/5xx (not after other 4xx, an
            invalid body or an unparsable reply: those are not transient).
        retry_backoff: sleep ``retry_backoff · 2**attempt`` seconds before retry ``attempt + 1``.
        temperature / max_tokens / seed: sent with every request (the paper's judge runs at temperature 0.1; ``seed``
            is sent only when given — vLLM honours it).
        prompt_template: a ``str.format`` template with ``{question}``, ``{response}`` and ``{answer}``.
        system_prompt: an optional system message.
        max_workers: concurrent requests.
        errors: ``"raise"`` (default): the first failure raises :class:`JudgeError`; ``"nan"``: a failed response
            scores ``nan`` (a :class:`RuntimeWarning` says how many and why), so one bad reply does not stop a run.
        extra_body: more JSON fields for every request (e.g. ``{"top_p": 0.9}``).

    Raises (from :meth:`score` with ``errors="raise"``, and from :meth:`complete`):
        JudgeError: a message naming the endpoint and what went wrong, e.g.
        ``judge endpoint http://127.0.0.1:8000/v1/chat/completions: HTTP 500 (Internal Server Error) after 3
        attempts: ...``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: Optional[str] = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        temperature: float = 0.1,
        max_tokens: int = 16,
        seed: Optional[int] = None,
        prompt_template: str = PAPER_JUDGE_PROMPT,
        system_prompt: Optional[str] = None,
        max_workers: int = 8,
        errors: str = "raise",
        extra_body: Optional[Mapping[str, Any]] = None,
    ):
        if not isinstance(base_url, str) or not re.match(r"^https?://", base_url):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name, got {model!r}")
        check_positive("timeout", timeout)
        check_positive("retry_backoff", retry_backoff, allow_zero=True)
        check_range("temperature", temperature, 0.0, 2.0)
        for name, value, lo in (("max_retries", max_retries, 0), ("max_tokens", max_tokens, 1),
                                ("max_workers", max_workers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        check_choice("errors", errors, ("raise", "nan"))
        try:
            prompt_template.format(question="q", response="r", answer="a")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"prompt_template must be a str.format template using only {{question}}, {{response}} "
                             f"and {{answer}}: {e!r}") from None
        url = base_url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        if api_key is None:
            api_key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None: read from the environment)")
        self._api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.retry_backoff = float(retry_backoff)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.seed = seed
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.max_workers = max_workers
        self.errors = errors
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        auth = ", api_key=<set>" if self._api_key else ""
        return f"OpenAIChatJudge(endpoint={self.endpoint!r}, model={self.model!r}{auth})"

    @property
    def has_api_key(self) -> bool:
        """Whether requests carry an ``Authorization`` header (the key itself is not exposed)."""
        return bool(self._api_key)

    def __getstate__(self):  # pickling (DataLoader workers, copies) must not carry the key to disk
        state = dict(self.__dict__)
        state["_api_key"] = None
        return state

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    # -- scoring --------------------------------------------------------------------------------------------------
    def messages(self, request: JudgeRequest) -> List[Dict[str, str]]:
        """The chat messages sent for ``request``."""
        user = self.prompt_template.format(question=request.prompt, response=request.response,
                                           answer=request.ground_truth)
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def score_one(self, request: JudgeRequest) -> float:
        """The score of one request; raises :class:`JudgeError` on any failure."""
        reply = self.complete(self.messages(request))
        try:
            return parse_score(reply)
        except ValueError as e:
            raise JudgeError(f"judge endpoint {self.endpoint}: {e}") from None

    def score(self, requests: Sequence[JudgeRequest]) -> List[float]:
        requests = _check_requests(requests)
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(requests))) as pool:
            futures = [pool.submit(self.score_one, r) for r in requests]
            out: List[float] = []
            failures: List[str] = []
            for f in futures:
                try:
                    out.append(f.result())
                except JudgeError as e:
                    if self.errors == "raise":
                        for g in futures:
                            g.cancel()
                        raise
                    out.append(float("nan"))
                    failures.append(str(e))
        if failures:
            warnings.warn(f"{len(failures)} of {len(requests)} responses could not be scored and got nan; first: "
                          f"{failures[0]}", RuntimeWarning, stacklevel=2)
        return out

    # -- transport ------------------------------------------------------------------------------------------------
    def complete(self, messages: List[Dict[str, str]]) -> str:
        """POST one chat completion and return ``choices[0].message.content`` (retries per the class docstring)."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        if self.seed is not None:
            body["seed"] = self.seed
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                detail = _read_error_body(e)
                last = f"HTTP {e.code} ({e.reason}){': ' + detail if detail else ''}"
                if e.code in _RETRY_STATUS:
                    continue
                raise self._error(last, attempt + 1) from None
            except (socket.timeout, TimeoutError) as e:
                last = f"no reply within timeout={self.timeout:g}s ({e})"
                continue
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"no reply within timeout={self.timeout:g}s ({reason})"
                else:
                    last = f"cannot reach the server ({reason})"
                continue
            except (http.client.HTTPException, ConnectionError, OSError) as e:
                last = f"connection failed ({type(e).__name__}: {e})"
                continue
            return self._content(status, raw)
        raise self._error(last, attempts)

    def _error(self, reason: str, attempts: int) -> JudgeError:
        return JudgeError(self._redact(f"judge endpoint {self.endpoint}: {reason} after {attempts} attempt"
                                       f"{'s' if attempts != 1 else ''}"))

    def _content(self, status: int, raw: bytes) -> str:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise JudgeError(self._redact(f"judge endpoint {self.endpoint} returned invalid JSON (HTTP {status}, "
                                          f"{e}): {_snippet(raw.decode('utf-8', 'replace'))}")) from None
        try:
            content = obj["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(self._redact(f"judge endpoint {self.endpoint} returned an unexpected response: "
                                          f"expected choices[0].message.content, got {_snippet(json.dumps(obj))}")) \
                from None
        if not isinstance(content, str):
            raise JudgeError(self._redact(f"judge endpoint {self.endpoint} returned a non-text message content: "
                                          f"{_snippet(content)}"))
        return content


def _read_error_body(e: urllib.error.HTTPError) -> str:
    try:
        return _snippet(e.read().decode("utf-8", "replace"), 160)
    except Exception:  # noqa: BLE001 - the status is what matters; the body is a courtesy
        return ""


def _check_requests(requests: Sequence[JudgeRequest]) -> List[JudgeRequest]:
    if isinstance(requests, JudgeRequest) or not isinstance(requests, Sequence):
        raise ValueError(f"requests must be a sequence of JudgeRequest, got {type(requests).__name__}")
    for i, r in enumerate(requests):
        if not isinstance(r, JudgeRequest):
            raise ValueError(f"requests[{i}] must be a JudgeRequest, got {type(r).__name__}")
        for name in ("prompt", "response", "ground_truth"):
            if not isinstance(getattr(r, name), str):
                raise ValueError(f"requests[{i}].{name} must be a str, got {type(getattr(r, name)).__name__}")
    return list(requests)


JUDGES = ("shapes", "http")
# Environment variables the HTTP judge reads its API key from, in order.
API_KEY_ENV = ("VPO_JUDGE_API_KEY", "OPENAI_API_KEY")


def make_judge(kind: str = "shapes", *, url: Optional[str] = None, model: Optional[str] = None, **kwargs) -> Judge:
    """A judge by name: ``"shapes"`` (:class:`ShapesWorldJudge`) or ``"http"`` (:class:`OpenAIChatJudge` on ``url``
    serving ``model``; ``kwargs`` go to it). Used by ``vpo ovip`` and the trainer's online OViP (``online_judge``)."""
    check_choice("judge", kind, JUDGES)
    if kind == "shapes":
        return ShapesWorldJudge()
    if not url or not model:
        raise ValueError("the http judge needs a url (the endpoint's API root, e.g. http://127.0.0.1:8000/v1) and "
                         "the served model's name")
    return OpenAIChatJudge(url, model, **kwargs)
