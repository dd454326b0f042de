"""Data where users have it: every container (JSONL, save_to_disk, parquet, datasets.Dataset, rows) and every layout
(vpo, RLAIF-V, RLHF-V, TRL plain and conversational, several images) gives the same records and batches; a dataset
whose records are all skipped is an error naming the first reason."""
import io
import json
import warnings

import pytest
import torch

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from vpo.data import PreferenceCollator, build_tiny_processor, record_from_row  # noqa: E402
from vpo.data.records import SkipRecord  # noqa: E402
from vpo.data.sources import NoUsableRecordError, open_preference_data  # noqa: E402

COLORS = ["red", "green", "blue", "white"]


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def trl_rows(conversational=False):
    out = []
    for i, c in enumerate(COLORS):
        prompt, chosen, rejected = "what color is the cat ?", f"the cat is {c} .", "the cat is black ."
        if conversational:
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            chosen = [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}]
            rejected = [{"role": "assistant", "content": rejected}]
        out.append({"images": [Image.new("RGB", (24, 24), c)], "prompt": prompt, "chosen": chosen,
                    "rejected": rejected})
    return out


def _features(images_list=True):
    f = {"prompt": datasets.Value("string"), "chosen": datasets.Value("string"), "rejected": datasets.Value("string")}
    f["images" if images_list else "image"] = datasets.List(datasets.Image()) if images_list else datasets.Image()
    return datasets.Features(f)


def _batch(ds, method="dpo"):
    col = PreferenceCollator(build_tiny_processor("llava"), "llava", method=method)
    return col([ds[i] for i in range(len(ds))])


def _reference_batch():
    return _batch(open_preference_data(trl_rows()))


@pytest.mark.parametrize("container", ["dataset", "datasetdict", "save_to_disk", "parquet_file", "parquet_folder",
                                       "jsonl", "rows"])
def test_every_container_gives_the_same_batch(container, tmp_path):
    rows = trl_rows()
    want = _reference_batch()
    if container == "jsonl":
        lines = []
        for i, r in enumerate(rows):
            r["images"][0].save(tmp_path / f"{i}.png")
            lines.append(json.dumps({"images": [f"{i}.png"], "prompt": r["prompt"], "chosen": r["chosen"],
                                     "rejected": r["rejected"]}))
        (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
        data = str(tmp_path / "d.jsonl")
    elif container == "rows":
        data = rows
    else:
        ds = datasets.Dataset.from_list(rows, features=_features())
        if container == "dataset":
            data = ds
        elif container == "datasetdict":
            data = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
        elif container == "save_to_disk":
            ds.save_to_disk(str(tmp_path / "saved"))
            data = str(tmp_path / "saved")
        elif container == "parquet_file":
            ds.to_parquet(str(tmp_path / "train.parquet"))
            data = str(tmp_path / "train.parquet")
        else:
            (tmp_path / "data").mkdir()
            ds.select([0, 1]).to_parquet(str(tmp_path / "data" / "train-00000-of-00002.parquet"))
            ds.select([2, 3]).to_parquet(str(tmp_path / "data" / "train-00001-of-00002.parquet"))
            ds.select([0]).to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
            data = str(tmp_path)
    got = open_preference_data(data)
    assert len(got) == 4 and got.stats.kept == 4
    batch = _batch(got)
    for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
        torch.testing.assert_close(batch[key], want[key])


@pytest.mark.parametrize("form", ["pil", "path", "bytes", "hf_dict", "hf_path_dict", "data_uri"])
def test_image_forms(form, tmp_path):
    import base64

    Image.new("RGB", (24, 24), "red").save(tmp_path / "a.png")
    image = {"pil": Image.new("RGB", (24, 24), "red"), "path": str(tmp_path / "a.png"), "bytes": _png("red"),
             "hf_dict": {"bytes": _png("red"), "path": None}, "hf_path_dict": {"bytes": None, "path": "a.png"},
             "data_uri": "data:image/png;base64," + base64.b64encode(_png("red")).decode()}[form]
    ds = open_preference_data([{"image": image, "prompt": "what is it ?", "chosen": "red .", "rejected": "blue ."}],
                              image_root=str(tmp_path))
    batch = _batch(ds)
    ref = _batch(open_preference_data([{"image": Image.new("RGB", (24, 24), "red"), "prompt": "what is it ?",
                                        "chosen": "red .", "rejected": "blue ."}]))
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"])


def test_layouts_rlaif_rlhf_trl_conversational_give_the_same_tokens():
    img = Image.new("RGB", (24, 24), "red")
    base = {"prompt": "what color is the cat ?", "chosen": "red .", "rejected": "blue ."}
    layouts = {
        "vpo": {"id": "x", "image": img, **base},
        "rlaif-v": {"idx": "x", "image": img, "question": base["prompt"], "chosen": "red .", "rejected": "blue .",
                    "ds_name": "d", "origin_dataset": "o"},
        "rlhf-v": {"idx": "x", "image": img, "text": json.dumps({"question": base["prompt"], "chosen": "red .",
                                                                  "rejected": "blue ."})},
        "trl-plain": {"id": "x", "images": [img], **base},
        "trl-conv": {"id": "x", "images": [img], "prompt": [{"role": "user", "content": [
            {"type": "text", "text": base["prompt"]}]}], "chosen": [{"role": "assistant", "content": "red ."}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue ."}]}]},
        "trl-image": {"id": "x", "image": img, "prompt": [{"role": "user", "content": base["prompt"]}],
                      "chosen": "red .", "rejected": "blue ."},
    }
    batches = {k: _batch(open_preference_data([row])) for k, row in layouts.items()}
    for k, b in batches.items():
        assert b["ids"] == ["x"], k
        torch.testing.assert_close(b["input_ids"], batches["vpo"]["input_ids"], msg=k)
        torch.testing.assert_close(b["labels"], batches["vpo"]["labels"], msg=k)


def test_conversation_with_system_turn_and_several_images():
    proc = build_tiny_processor("qwen2_vl")
    row = {"id": "m", "images": [Image.new("RGB", (24, 16), "red"), Image.new("RGB", (24, 16), "blue")],
           "prompt": [{"role": "system", "content": "you describe the image ."},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                   {"type": "image"}, {"type": "text", "text": "what color ?"}]}],
           "chosen": "red and blue .", "rejected": "green ."}
    rec = record_from_row(row)
    assert isinstance(rec.image, list) and len(rec.image) == 2 and rec.prompt[0]["role"] == "system"
    batch = PreferenceCollator(proc, "qwen2_vl", method="tpo")([rec])
    text = proc.tokenizer.decode(batch["input_ids"][0])
    assert text.count("<|vision_start|>") == 2 and "system you describe the image" in text
    assert batch["image_grid_thw"].shape[0] == 4 and batch["sub"]["noised"]["image_grid_thw"].shape[0] == 4


def test_skips_name_their_reason():
    img = Image.new("RGB", (24, 24), "red")
    bad_parts = {"images": [img], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                          {"type": "text", "text": "what ?"}]}],
                 "chosen": "a .", "rejected": "b ."}
    with pytest.raises(SkipRecord, match="2 image parts"):
        record_from_row({**bad_parts, "images": [img, img, img]})
    with pytest.raises(SkipRecord, match="assistant"):
        record_from_row({"images": [img], "prompt": "q", "chosen": [{"role": "user", "content": "x"}],
                         "rejected": "b"})
    with pytest.raises(SkipRecord, match="end with a user turn"):
        record_from_row({"images": [img], "prompt": [{"role": "assistant", "content": "x"}], "chosen": "a",
                         "rejected": "b"})
    # several images with a single-image method: skipped by the collator with the reason
    col = PreferenceCollator(build_tiny_processor("llava"), "llava", method="mdpo")
    with pytest.warns(Warning, match="one image per example"):
        out = col([record_from_row({"images": [img, img], "prompt": "q ?", "chosen": "a .", "rejected": "b ."})])
    assert out == {"ids": [], "skipped": {"bad_field": 1}}


def test_all_records_skipped_is_an_error_naming_the_first_reason(tmp_path):
    # The case: a TRL dataset read as if it were vpo's layout.
    ds = datasets.Dataset.from_list(trl_rows(), features=_features())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoUsableRecordError, match=r"all 4 records were skipped \(missing_field: 4\).*'image'"):
            open_preference_data(ds, layout="vpo")
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoUsableRecordError, match="bad_json: 1.*first: skipped record 'bad.jsonl:1'"):
            open_preference_data(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(NoUsableRecordError, match="no records"):
        open_preference_data(str(tmp_path / "empty.jsonl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(open_preference_data(str(path), allow_empty=True)) == 0


def test_bad_sources_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_preference_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="data must be a path"):
        open_preference_data(42)
    with pytest.raises(ValueError, match="layout must be one of"):
        open_preference_data([], layout="sharegpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="without a save_to_disk dataset"):
        open_preference_data(str(tmp_path / "folder"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read parquet"):
        open_preference_data(str(tmp_path / "bad.parquet"))
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(trl_rows(), features=_features())})
    with pytest.raises(ValueError, match="without split 'train'"):
        open_preference_data(dd)


def test_hf_table_rows_stay_undecoded_until_collation():
    ds = datasets.Dataset.from_list(trl_rows(), features=_features())
    got = open_preference_data(ds)
    rec = got[0]
    assert isinstance(rec.image, dict) and rec.image["bytes"]  # a {"bytes", "path"} cell, decoded by the collator


def test_scan_reads_no_image_bytes_and_respects_views():
    rows = trl_rows()
    ds = datasets.Dataset.from_list(rows, features=_features())
    broken = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    broken = broken.map(lambda r, i: {"images": [{"bytes": b"not an image" if i == 1 else r["images"][0]["bytes"],
                                                  "path": None}]}, with_indices=True)
    got = open_preference_data(broken)
    assert len(got) == 4  # the scan never decoded the bad image: the collator skips it, with its reason
    with pytest.warns(Warning, match="unreadable_image"):
        batch = _batch(got)
    assert batch["skipped"] == {"unreadable_image": 1} and len(batch["ids"]) == 3
    view = ds.select([3, 1])  # an indices mapping over the Arrow table
    assert [open_preference_data(view)[k].chosen for k in range(2)] == ["the cat is white .", "the cat is green ."]
    single = datasets.Dataset.from_list(
        [{"image": Image.new("RGB", (24, 24), "red"), "prompt": "q ?", "chosen": "a .", "rejected": "b ."},
         {"image": None, "prompt": "q ?", "chosen": "a .", "rejected": "b ."}],
        features=_features(images_list=False))
    with pytest.warns(Warning, match="missing field 'image'"):
        got = open_preference_data(single)
    assert len(got) == 1 and got.stats.skipped == {"missing_field": 1}
