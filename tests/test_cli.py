"""The ``didp`` command: the predictor without Docker, with ``cog predict``'s input syntax."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from commands.didp import main
from testkit.locks import held_by_another_process

FAST = [
    "-i",
    "iterations=2",
    "-i",
    "display_freq=1",
    "-i",
    "num_scales=5",
    "-i",
    "num_cutouts=4",
    "-i",
    "prior_steps=8",
]


def run(tmp_path, capsys, *args):
    code = main([*args, "--weights", "tiny", "-o", str(tmp_path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_input_with_range_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    expected = "num_scales (integer): Depth of the network (at most 6 at 256 px, 7 at 512 px); range 1..10; default 6"
    assert expected in text
    assert "offset_type (string)" in text and "one of none, 1x1, full" in text
    assert "prompt (string): Caption to visualise: what CLIP should see; not blank; required" in text
    for name in ("seed", "guidance_scale", "prior_steps", "mode", "size", "display_freq", "iterations"):
        assert f"  {name} (" in text
    assert "image (path): " in text and "a file, name=@path or name=path; optional" in text
    assert "interpolation_steps (integer): " in text and "range 2..16; optional" in text


def test_a_run_writes_and_prints_every_file(tmp_path, capsys):
    code, out, _ = run(tmp_path, capsys, "-i", "prompt=a red cube", "-i", "seed=5", *FAST)
    assert code == 0
    printed = out.split()
    names = [p.rsplit("/", 1)[-1] for p in printed]
    assert names == [
        "text_tokens.npy",
        "text_embedding.npy",
        "image_embedding.npy",
        "step_0001.png",
        "step_0002.png",
        "result.json",
    ]
    assert np.load(tmp_path / "text_tokens.npy").shape == (1, 77)
    assert Image.open(tmp_path / "step_0002.png").size == (256, 256)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["seed"] == 5 and result["inputs"]["iterations"] == 2


def test_a_run_leaves_its_files_only_in_the_output_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIDP_OUTPUT_DIR", str(tmp_path / "server-side"))
    code, _, _ = run(tmp_path / "out", capsys, "-i", "prompt=a red cube", "-i", "seed=5", *FAST)
    assert code == 0 and len(list((tmp_path / "out").iterdir())) == 6
    assert list((tmp_path / "server-side").iterdir()) == []  # the predictor's run directory is gone


def test_a_second_run_into_the_same_directory_replaces_the_first_runs_files_only(tmp_path, capsys, monkeypatch):
    sequence = ["-i", "interpolate_to=a bird", "-i", "interpolation_steps=2"]
    code, _, _ = run(tmp_path, capsys, "-i", "prompt=a dog", *sequence, *FAST)
    assert code == 0 and (tmp_path / "interpolation.webp").is_file() and (tmp_path / "frame_02.png").is_file()
    mine = {"notes.txt", "step_by_step.png", "best_of_show.png"}
    for name in mine:
        (tmp_path / name).write_text("mine")
    before = {p.name for p in tmp_path.iterdir()}
    monkeypatch.setenv("DIDP_MEMORY_BUDGET_MB", "1")
    code, _, err = run(tmp_path, capsys, "-i", "prompt=a bird", *FAST)  # refused before any work
    assert code == 2 and "memory" in err and {p.name for p in tmp_path.iterdir()} == before  # nothing lost
    monkeypatch.delenv("DIDP_MEMORY_BUDGET_MB")
    # an output of the earlier run as this run's input: copied before the earlier files go
    args = ["-i", "prompt=a bird", "-i", f"image=@{tmp_path / 'frame_02.png'}", "-i", "seed=5", *FAST]
    code, out, err = run(tmp_path, capsys, *args)
    assert code == 0 and "replaced the" in err, err
    written = {line.rsplit("/", 1)[-1] for line in out.split()}
    assert {p.name for p in tmp_path.iterdir()} == written | mine
    assert json.loads((tmp_path / "result.json").read_text())["inputs"]["prompt"] == "a bird"


def test_whole_numbers_written_as_floats_are_integers_as_on_the_server(tmp_path, capsys):
    code, _, err = run(
        tmp_path, capsys, "-i", "prompt=x", "-i", "mode=embed", "-i", "prior_steps=8.0", "-i", "seed=1e3"
    )
    assert code == 0, err
    inputs = json.loads((tmp_path / "result.json").read_text())["inputs"]
    assert (inputs["prior_steps"], inputs["seed"]) == (8, 1000)
    code, _, err = run(tmp_path, capsys, "-i", "prompt=x", "-i", "prior_steps=8.5")
    assert code == 2 and "prior_steps: 8.5 is not of type" in err


def test_best_of_n_seeds_wrap_past_the_largest_so_each_can_be_given_back(tmp_path, capsys):
    code, _, err = run(tmp_path, capsys, "-i", "prompt=x", "-i", "seed=100000", "-i", "num_outputs=2", *FAST)
    assert code == 0, err
    outputs = json.loads((tmp_path / "result.json").read_text())["outputs"]
    assert sorted(o["seed"] for o in outputs) == [0, 100000]


def test_same_seed_twice_gives_identical_files(tmp_path, capsys):
    digests = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        code, _, _ = run(out, capsys, "-i", "prompt=a blue sphere", "-i", "seed=11", *FAST)
        assert code == 0
        digests.append(
            {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.suffix != ".json"}
        )
    assert digests[0] == digests[1] and len(digests[0]) == 5


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("num_scales=11", "num_scales"),
        ("iterations=abc", "iterations"),
        ("size=300", "size"),
        ("offset_type=random", "offset_type"),
        ("colour=red", "colour: unknown input"),
    ],
)
def test_invalid_inputs_are_refused_before_any_work(tmp_path, capsys, arg, message):
    code, out, err = run(tmp_path, capsys, "-i", "prompt=x", "-i", arg)
    assert code == 2 and out == ""
    assert message in err


def test_a_missing_prompt_is_refused(tmp_path, capsys):
    code, _, err = run(tmp_path, capsys, "-i", "seed=1")
    assert code == 2 and "prompt" in err


def test_impossible_num_scales_for_the_size_names_the_input(tmp_path, capsys):
    code, out, err = run(tmp_path, capsys, "-i", "prompt=x", "-i", "num_scales=10", "-i", "size=256")
    assert code == 2 and "num_scales" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "num_scales=8"], "num_scales=8 does not fit size=256"),
        (["-i", "interpolation_steps=4"], "interpolation_steps needs interpolate_to or edit_prompt"),
        (["-i", "image=@/no/such/picture.png"], "image: no such file: /no/such/picture.png"),
        (["-i", "image=https://example.com/a.jpg"], "image: didp reads local files (-i image=@path)"),
        (["-i", "image=data:image/png;base64,AAAA"], "a URL or data: URI works over HTTP"),
        (["-i", "image="], "image: give a file: -i image=@path"),
        (["-i", "image=@"], "image: give a file"),
    ],
)
def test_requests_that_cannot_work_are_refused_before_the_weights_load(tmp_path, capsys, args, message):
    missing = tmp_path / "no-weights-here"  # setup would fail on these: the request must fail first
    code = main(["-i", "prompt=x", *args, "--weights", str(missing), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "setup failed" not in err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_picture_is_refused_before_the_weights_load(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    args = ["-i", "prompt=x", "-i", f"image=@{tmp_path / 'notes.png'}", "--weights", str(tmp_path / "nowhere")]
    code = main([*args, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "image: not a PNG, JPEG or WebP file" in err and "setup failed" not in err


def test_a_blank_prompt_is_refused_in_plain_words(tmp_path, capsys):
    code, out, err = run(tmp_path, capsys, "-i", "prompt=   ")
    assert code == 2 and out == "" and 'prompt: "   " is blank: give some text' in err


def test_an_output_path_that_is_a_file_is_refused_before_the_weights_load(tmp_path, capsys):
    (tmp_path / "result.json").write_text("{}")
    code = main(["-i", "prompt=x", "--weights", str(tmp_path / "nowhere"), "-o", str(tmp_path / "result.json")])
    err = capsys.readouterr().err
    assert code == 2 and "not a directory" in err and "Traceback" not in err


def test_missing_weights_fail_with_a_clear_message(tmp_path, capsys):
    code = main(["-i", "prompt=x", "--weights", str(tmp_path / "nowhere"), "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "setup failed" in err and "nowhere" in err


def test_a_run_into_a_directory_another_run_is_writing_to_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text("the other run's")
    with held_by_another_process(out):
        code = main(["-i", "prompt=x", "--weights", str(tmp_path / "no-weights"), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "another didp run is writing there" in err and "setup failed" not in err
        assert (out / "result.json").read_text() == "the other run's"
    code, _, _ = run(out, capsys, "-i", "prompt=x", "-i", "mode=embed", "-i", "prior_steps=8")
    assert code == 0 and (out / "text_embedding.npy").is_file()  # free again once the other run ended


def test_a_run_that_fails_to_set_up_leaves_no_new_directory(tmp_path, capsys):
    code = main(["-i", "prompt=x", "--weights", str(tmp_path / "nowhere"), "-o", str(tmp_path / "a" / "new")])
    assert code == 1 and "setup failed" in capsys.readouterr().err
    assert not (tmp_path / "a" / "new").exists()


def test_an_output_directory_that_cannot_be_made_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main(["-i", "prompt=x", "--weights", "tiny", "-o", str(tmp_path / "file" / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and "file/sub: Not a directory" in err and "Traceback" not in err


def test_a_local_file_named_like_a_data_uri_is_read_as_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "data:x.png")
    code = main(["-i", "prompt=x", "-i", "image=@data:x.png", "--weights", str(tmp_path / "nowhere"), "-o", "out"])
    err = capsys.readouterr().err
    assert code == 1 and "setup failed" in err  # the picture was accepted; only the weights are missing
