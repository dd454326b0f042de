"""The demo's printout says when two methods tie, and why (a tie of TPO and DPO reads like a bug otherwise)."""
from vpo.demo_report import TABLE, format_table, tie_notes


def _summary(tpo_after, dpo_after, reward_grad=False):
    before = {name: 0.5 for name in TABLE}
    before.update({"mentions": 100, "CHAIR_i_se": 0.01})
    res = lambda after: {"after": after, "curve": {}, "steps": 1, "seconds": 1.0}  # noqa: E731
    return {"before": before, "methods": {"tpo": res(tpo_after), "dpo": res(dpo_after)}, "sft": {},
            "settings": {"tpo_reward_grad": reward_grad}}


def test_a_tie_is_named_with_its_reason():
    after = {name: 0.4 for name in TABLE}
    close = {**after, "CHAIR_i": 0.40004}  # equal to the printed 3 decimals
    text = format_table(_summary(after, close))
    line = [ln for ln in text.splitlines() if "tie" in ln]
    assert len(line) == 1 and line[0].startswith("tpo and dpo tie (every metric equal to 3 decimals)")
    assert "c_theta detached" in line[0]
    assert "c_theta detached" not in tie_notes(_summary(after, close, reward_grad=True))[0]


def test_no_tie_no_line():
    after = {name: 0.4 for name in TABLE}
    assert tie_notes(_summary(after, {**after, "coverage": 0.41})) == []
