"""No silent wrong results at the edges of a run's life: resume, locks, the final save, evaluations."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ambient.errors import RunRefused
from ambient.rundir import RunDir, RunLock
from ambient.training import train
from tests.helpers import compose

TINY = ["experiment=smoke", "dataset.limit=24", "train.steps=4", "train.checkpoint_every=2", "sample.count=0"]


def _weights(run):
    return load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stop_during_final_save(monkeypatch):
    """The final save writes part of the model, then the disk is full."""
    import ambient.training

    original = ambient.training.save_trained

    def full_disk(model_dir, *args, **kwargs):
        original(model_dir, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ambient.training, "save_trained", full_disk)


def _train_until_final_save(monkeypatch, overrides, run_dir):
    """A run that trains every step, then fails in its final save: checkpoints, no model."""
    with monkeypatch.context() as m:
        _stop_during_final_save(m)
        with pytest.raises(OSError):
            train(compose("train", overrides), run_dir)


def test_a_failed_final_save_leaves_no_model_and_resume_completes_it(tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(compose("train", TINY), straight)
    with monkeypatch.context() as m:
        _stop_during_final_save(m)
        with pytest.raises(OSError, match="No space left"):
            train(compose("train", TINY), broken)
    run = RunDir(broken)
    assert not run.model.exists() and not run.has_model() and not run.is_finished()
    assert not run.lock.exists()  # released on the way out

    summary = train(compose("train", [*TINY, "resume=auto"]), broken)
    assert run.is_finished() and not run.model_tmp.exists() and summary["final_loss"] == summary["final_loss"]
    assert _same(_weights(straight), _weights(broken))  # resumed at the final step: nothing retrained


def test_resume_with_another_config_is_refused_naming_the_keys_and_touching_nothing(tmp_path, monkeypatch):
    _train_until_final_save(monkeypatch, [*TINY, "corruption=mask90"], tmp_path)
    run = RunDir(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for change, key in ((["corruption=mask60"], "corruption.p"), (["dataset.resolution=8"], "dataset.resolution"),
                        (["train.lr=0.5"], "train.lr")):
        with pytest.raises(RunRefused, match=key.replace(".", r"\.")):
            train(compose("train", [*TINY, "corruption=mask90", *change, "resume=auto"]), tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and not run.failed.exists()
    # Keys that do not change training may differ; the run then completes.
    train(compose("train", [*TINY, "corruption=mask90", "resume=auto", "logger=wandb", "train.log_every=1",
                            "evaluate.after_train=true", "evaluate.overrides=['attack.features=random_projection']"]),
          tmp_path)
    assert run.is_finished()


def test_a_refusal_never_overwrites_the_failure_it_follows(tmp_path):
    run = RunDir(tmp_path)
    run.record_failure(OSError("disk full"), ["corruption=mask90"])
    assert run.record_failure(RunRefused("in use"), []) is None
    assert "disk full" in json.loads(run.failed.read_text())["error"]


def test_a_finished_run_clears_the_failure_of_an_earlier_attempt(tmp_path, monkeypatch):
    _train_until_final_save(monkeypatch, TINY, tmp_path)
    RunDir(tmp_path).record_failure(OSError("No space left on device"))
    train(compose("train", [*TINY, "resume=auto"]), tmp_path)
    assert RunDir(tmp_path).is_finished() and not RunDir(tmp_path).failed.exists()


def test_a_run_dir_in_use_is_refused_naming_its_holder(tmp_path):
    import socket

    run = RunDir(tmp_path)
    with RunLock(run):
        assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    assert not run.lock.exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live training process
    try:
        run.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "time": "now"}))
        with pytest.raises(RunRefused, match=f"in use by pid {other.pid}"):
            train(compose("train", TINY), tmp_path)
        assert not run.config.exists() and not run.checkpoints.exists() and not run.failed.exists()
    finally:
        other.kill()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = RunDir(tmp_path)
    import socket

    run.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": "then"}))
    with RunLock(run) as lock:
        assert lock.held and json.loads(run.lock.read_text())["pid"] == os.getpid()
    # Another host's lock cannot be checked from here: refused, with how to clear it.
    run.lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": "then"}))
    with pytest.raises(RunRefused, match="delete .*\\.lock if that process is gone"):
        RunLock(run).acquire()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for seed in (0, 1):
        run = tmp_path_factory.mktemp(f"run{seed}")
        train(compose("train", [*TINY, "train.checkpoint_every=0", f"seed={seed}", "dataset.holdout=4"]), run)
        runs.append(run)
    return runs


def _eval_cfg(run, out, n=4):
    return compose("evaluate", [f"run_dir={run}", f"out_dir={out}", f"attack.samples_per_prompt={n}",
                                "attack.batch_size=4", "attack.num_steps=3", "mia.draws=1"])


def test_an_evaluation_never_reuses_another_models_generations(two_runs, tmp_path):
    from ambient.evaluation import evaluate_run

    a, b = two_runs
    evaluate_run(a, _eval_cfg(a, tmp_path), tmp_path)
    with pytest.raises(ValueError, match="another model"):
        evaluate_run(b, _eval_cfg(b, tmp_path), tmp_path)
    assert not (tmp_path / "report-1.json").exists()


def test_an_unreadable_generation_is_regenerated_with_a_warning(two_runs, tmp_path):
    from ambient.evaluation import evaluate_run

    run = two_runs[0]
    evaluate_run(run, _eval_cfg(run, tmp_path), tmp_path)
    folder = tmp_path / "samples" / "unconditional"
    good = (folder / "000002.png").read_bytes()
    (folder / "000002.png").write_bytes(b"")  # what a kill during a plain write leaves
    with pytest.warns(UserWarning, match="regenerating 1 unreadable"):
        evaluate_run(run, _eval_cfg(run, tmp_path), tmp_path)
    assert (folder / "000002.png").read_bytes() == good and not list(folder.glob(".*.tmp"))


def test_a_resume_logs_each_step_once_and_counts_every_segments_seconds(tmp_path, monkeypatch):
    args = [*TINY, "train.log_every=1"]
    _train_until_final_save(monkeypatch, args, tmp_path)
    run = RunDir(tmp_path)
    import shutil

    from ambient.checkpoints import latest_checkpoint

    state = torch.load(latest_checkpoint(run.checkpoints) / "custom_checkpoint_1.pkl", weights_only=True)
    first_segment = state["seconds"]
    shutil.rmtree(run.checkpoints / "checkpoint-0000004")  # as if killed between steps 2 and 4
    summary = train(compose("train", [*args, "resume=auto"]), tmp_path)
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert first_segment > 0 and summary["train_seconds"] >= first_segment


@pytest.mark.parametrize("override,key", [
    (["seed=-1"], "seed"),
    (["attack.prompts=-1"], "attack.prompts"),
    (["attack.prompts=[1,-2]"], "attack.prompts"),
    (["attack.prompts=abc"], "attack.prompts"),
    (["device=cuda:x"], "device"),
    (["mia.seed=-3"], "mia.seed"),
    (["attack.inception_weights=/no/such/file.pth"], "attack.inception_weights"),
])
def test_late_or_raw_errors_now_fail_at_start_naming_the_key(override, key, two_runs):
    from ambient.config import ConfigError, validate_evaluate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_evaluate(compose("evaluate", [f"run_dir={two_runs[0]}", *override]))


@pytest.mark.parametrize("override,key", [(["channels=2"], "channels"), (["resolution=0"], "resolution")])
def test_folder_mode_settings_are_checked(override, key, tmp_path):
    from ambient.config import ConfigError, validate_evaluate

    with pytest.raises(ConfigError, match=key):
        validate_evaluate(compose("evaluate", [f"samples={tmp_path}", f"train_data={tmp_path}", *override]))


def test_loose_images_beside_prompt_folders_are_refused(tmp_path):
    from PIL import Image

    from ambient.config import ConfigError, validate_evaluate

    (tmp_path / "class_0").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "stray.png")
    with pytest.raises(ConfigError, match="samples=.*not both"):
        validate_evaluate(compose("evaluate", [f"samples={tmp_path}", f"train_data={tmp_path}"]))


def test_tiny_and_elongated_images_are_loaded_with_a_warning(tmp_path):
    from PIL import Image

    from ambient.data import load_imagefolder

    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (3000, 3)).save(tmp_path / "strip.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="2 image.*dot.png.*strip.png|2 image.*strip.png.*dot.png"):
        load_imagefolder(str(tmp_path), 16)


def test_compare_says_a_report_is_unreadable(tmp_path):
    from ambient.compare import compare

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\ncorruption: {kind: none}\n")
    (run / "summary.json").write_text("{}")
    (run / "eval" / "report.json").write_text('{"counts": {"generations"')  # truncated
    row = compare([tmp_path])["rows"][0]
    assert "unreadable report eval/report.json" in row["error"]


def test_the_printed_run_dir_override_parses_back_to_the_path(tmp_path):
    import shlex

    from ambient.rundir import cli_override

    for path in (tmp_path / "plain", tmp_path / "captions=randomize,experiment=digits_text", tmp_path / "it's",
                 tmp_path / "a b"):
        words = shlex.split(f"python evaluate.py {cli_override('run_dir', path)}")
        assert len(words) == 3
        assert compose("evaluate", [words[2]]).run_dir == str(path)


@pytest.mark.slow
def test_a_refused_launch_keeps_the_runs_hydra_record_and_prints_a_working_attack_command(tmp_path):
    import shlex

    from tests.helpers import run_script

    run = tmp_path / "sweep" / "corruption=mask60,experiment=smoke"
    args = ["experiment=smoke", "train.steps=2", "train.checkpoint_every=0", "sample.count=0"]
    from ambient.rundir import cli_override

    done = run_script("train.py", *args, cli_override("run_dir", run).strip('"'))
    line = next(x for x in done.stdout.splitlines() if x.startswith("attack:"))
    words = shlex.split(line.removeprefix("attack:"))
    assert words[:2] == ["python", "evaluate.py"] and compose("evaluate", words[2:]).run_dir == str(run)
    record = (run / ".hydra" / "overrides.yaml").read_text()
    refused = run_script("train.py", *args, "corruption=mask90", cli_override("run_dir", run).strip('"'), check=False)
    assert refused.returncode != 0 and "already holds a finished model" in refused.stderr
    assert (run / ".hydra" / "overrides.yaml").read_text() == record and not (run / "failed.json").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    import signal
    import time

    from tests.helpers import REPO

    run = tmp_path / "run"
    args = ["experiment=smoke", "train.steps=100000", "train.checkpoint_every=0", "train.log_every=1",
            "sample.count=0", f"run_dir={run}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not checkpoints[0].name.endswith(".tmp")
    step = int(checkpoints[0].name.split("-")[1])
    assert f"stopped by SIGTERM at step {step}" in json.loads((run / "failed.json").read_text())["error"]
    hint = next(line for line in err.splitlines() if line.startswith("resume:"))
    assert "resume=auto" in hint and "run_dir=" in hint and "train.steps=100000" in hint


def _folder(root, n=24):
    from PIL import Image

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
    return root


def test_a_changed_image_folder_is_refused_by_resume_and_evaluate(tmp_path, monkeypatch):
    from PIL import Image

    from ambient.evaluation import evaluate_run

    folder = _folder(tmp_path / "images")
    args = [*TINY, "dataset=imagefolder", f"dataset.path={folder}", "dataset.channels=1", "dataset.resolution=16"]
    run = tmp_path / "run"
    _train_until_final_save(monkeypatch, args, run)
    assert len(json.loads((run / "images.json").read_text())["identities"]) == 24
    Image.new("L", (16, 16), 7).save(folder / "img000a.png")  # sorts between two trained images
    with pytest.raises(RunRefused, match=r"1 added \(img000a.png\)"):
        train(compose("train", [*args, "resume=auto"]), run)
    (folder / "img000a.png").unlink()
    train(compose("train", [*args, "resume=auto"]), run)

    (folder / "img005.png").unlink()
    with pytest.raises(ValueError, match=r"1 removed \(img005.png\)"):
        evaluate_run(run, _eval_cfg(run, tmp_path / "eval"), tmp_path / "eval")


def test_a_resume_whose_split_would_change_is_refused(tmp_path, monkeypatch):
    """The split is recomputed at every start: a recorded one that differs (another version's split)
    stops the resume instead of swapping members and held-out images mid-training."""
    args = [*TINY, "dataset.holdout=6"]
    _train_until_final_save(monkeypatch, args, tmp_path)
    run = RunDir(tmp_path)
    split = run.read_split()
    assert len(split["holdout"]) == 6
    swapped = {"members": sorted(split["members"][1:] + split["holdout"][:1]),
               "holdout": sorted(split["holdout"][1:] + split["members"][:1])}
    run.write_split(swapped["members"], swapped["holdout"])
    with pytest.raises(RunRefused, match="split of run_dir="):
        train(compose("train", [*args, "resume=auto"]), tmp_path)
    assert run.read_split() == swapped and not run.is_finished()  # nothing rewritten
    run.write_split(split["members"], split["holdout"])
    train(compose("train", [*args, "resume=auto"]), tmp_path)
    assert run.is_finished() and run.read_split() == split


def test_attack_prompts_that_do_not_fit_the_model_are_named():
    from types import SimpleNamespace

    from ambient.config import ConfigError
    from ambient.evaluation import prompts_of

    text = SimpleNamespace(is_text=True, settings={})
    classes = SimpleNamespace(is_text=False, settings={"num_classes": 10})
    plain = SimpleNamespace(is_text=False, settings={"num_classes": 0})
    for model, wanted in ((text, [1, 2]), (classes, [3, 10]), (classes, 5), (plain, [0])):
        with pytest.raises(ConfigError, match="attack.prompts"):
            prompts_of(model, wanted, ["a caption", "another"])
    assert list(prompts_of(classes, [3, 1])) == ["class_3", "class_1"]
    assert prompts_of(text, 1, ["b", "a", "b"]) == {"caption_0000_b": "b"}


def test_hydra_quoting_round_trips_backslashes_and_quotes():
    from ambient.rundir import hydra_quoted

    for text in ("/a/b", r"a\b=c", "it's", "end\\", r"x\'y", "c=1,d=2"):
        assert compose("evaluate", ["run_dir=" + hydra_quoted(text)]).run_dir == text


def test_own_pid_and_same_slurm_job_locks_are_stale(tmp_path, monkeypatch):
    import socket

    run = RunDir(tmp_path)
    run.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": "then"}))
    with RunLock(run) as lock:  # a restarted container reuses pids: our own pid cannot hold it
        assert lock.held
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run.lock.write_text(json.dumps({"host": "node-a", "pid": 7, "slurm_job": "4242", "time": "then"}))
    with RunLock(run) as lock:  # the same job, requeued on another node
        assert lock.held
    run.lock.write_text(json.dumps({"host": "node-a", "pid": 7, "slurm_job": "9999", "time": "then"}))
    with pytest.raises(RunRefused, match="in use"):
        RunLock(run).acquire()


def test_a_failed_launch_never_writes_into_another_runs_directory(tmp_path):
    from tests.helpers import run_script

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text("seed: 0\n")  # someone's run, in use or waiting for a resume
    run.record_failure(OSError("the real cause"))
    proc = run_script("train.py", "experiment=smoke", f"run_dir={run.path}", "train.lr=-1", check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr
    assert "the real cause" in json.loads(run.failed.read_text())["error"]


def test_a_saved_model_of_another_length_is_not_passed_off_as_this_run(tmp_path, monkeypatch):
    import ambient.training

    original = ambient.training._finish

    def crash_while_sampling(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("killed while sampling the grid")

    with monkeypatch.context() as m:
        m.setattr(ambient.training, "_finish", crash_while_sampling)
        with pytest.raises(RuntimeError):
            train(compose("train", TINY), tmp_path)
    assert RunDir(tmp_path).has_model() and not RunDir(tmp_path).is_finished()
    with pytest.raises(RunRefused, match="4-step run"):
        train(compose("train", [*TINY, "train.steps=8", "resume=auto"]), tmp_path)
    train(compose("train", [*TINY, "resume=auto"]), tmp_path)
    assert RunDir(tmp_path).is_finished()


def test_membership_scores_do_not_depend_on_the_batch_size(two_runs):
    from ambient.attack.membership import loss_scores
    from ambient.evaluation import rebuild_training_set
    from ambient.trained import load_run

    model = load_run(two_runs[0])
    members, _, _ = rebuild_training_set(two_runs[0], model.settings)
    x, ids = members.as_float(), members.indices.tolist()
    assert torch.allclose(loss_scores(model, x, ids, 100, 2, batch_size=7),
                          loss_scores(model, x, ids, 100, 2, batch_size=256), atol=1e-6)


def test_a_prompts_generations_do_not_depend_on_the_other_prompts():
    from ambient.evaluation import prompt_stream

    assert prompt_stream(7) == 7 and prompt_stream(None) == 0
    assert prompt_stream("a red cat") == prompt_stream("a red cat") != prompt_stream("a red dog")


def test_truncating_metrics_skips_a_line_cut_short(tmp_path):
    from ambient.checkpoints import truncate_metrics

    run = RunDir(tmp_path)
    run.metrics.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 1}\n{"step": 3, "lo')
    truncate_metrics(run, 2)
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2]


def test_a_config_typo_leaves_no_folder_and_touches_no_other_files(tmp_path):
    from tests.helpers import run_script

    new = tmp_path / "new_run"
    proc = run_script("train.py", "corruption=mask90", "corruption.p=1.5", f"run_dir={new}", check=False, timeout=120)
    assert proc.returncode != 0 and "corruption.p=1.5" in proc.stderr
    assert not new.exists()
    # a folder that already holds something (a user's files) keeps them; only this launch's record is added
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_script("train.py", "corruption=mask90", "corruption.p=1.5", f"run_dir={mine}", check=False, timeout=120)
    assert proc.returncode != 0 and (mine / "notes.txt").read_text() == "keep me"


def test_a_checkpoint_past_train_steps_is_refused_before_anything_is_written(tmp_path):
    first = tmp_path / "first"
    train(compose("train", [*TINY, "train.steps=4"]), first)  # checkpoints at steps 2 and 4
    checkpoint = sorted((first / "checkpoints").glob("checkpoint-*"))[-1]
    second = tmp_path / "second"
    with pytest.raises(RunRefused, match="past train.steps=2"):
        train(compose("train", [*TINY, "train.steps=2", f"resume={checkpoint}"]), second)
    assert not RunDir(second).summary.exists() and not RunDir(second).config.exists()


def test_an_evaluation_never_reuses_generations_made_with_other_sampling_settings(two_runs, tmp_path):
    from ambient.evaluation import evaluate_run

    a, _ = two_runs
    evaluate_run(a, _eval_cfg(a, tmp_path), tmp_path)
    other = compose("evaluate", [f"run_dir={a}", f"out_dir={tmp_path}", "attack.samples_per_prompt=4",
                                 "attack.batch_size=4", "attack.num_steps=4", "mia.draws=1"])
    with pytest.raises(ValueError, match="other sampling settings"):
        evaluate_run(a, other, tmp_path)
    assert not (tmp_path / "report-1.json").exists()
