"""Several processes, one run: run-directory stamps, 2 gloo ranks under accelerate launch, the
SLURM strategy's environment export, launcher configs, and sweeps that survive a failing job."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from ambient import launch
from ambient.rundir import ModelDir
from ambient.trained import load_run
from tests.helpers import REPO, run_script

SMALL = ["experiment=smoke", "train.steps=4", "sample.count=2", "train.checkpoint_every=0"]
DIST_KEYS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
             "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST"]


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed/SLURM variables; whatever the code under test exports is undone afterwards."""
    saved = dict(os.environ)
    for key in DIST_KEYS:
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def compose_with_hydra(overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- run stamps and rank-aware Hydra settings (fast) ---

def test_local_stamps_are_sub_second_and_distinct(clean_env):
    a, b = launch.run_stamp(), launch.run_stamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", a) and a != b


def test_ranks_of_one_launch_share_the_stamp_of_their_launcher(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("TORCHELASTIC_RUN_ID", "none")
    stamp = launch.run_stamp()
    assert stamp.endswith(f"-pid{os.getppid()}") and launch.run_stamp() == stamp


def test_slurm_stamps_name_the_job_and_never_repeat(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "77")
    assert launch.run_stamp().startswith("slurm-77/") and launch.run_stamp() != launch.run_stamp()
    clean_env.setenv("SLURM_ARRAY_JOB_ID", "70")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launch.run_stamp().startswith("slurm-70_3/")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")  # the tasks of one srun step: no common parent
    clean_env.setenv("SLURM_STEP_ID", "2")
    assert launch.run_stamp() == launch.run_stamp() == "slurm-70_3.2"


def test_run_dir_and_sweep_dir_share_one_stamp_and_root(clean_env):
    cfg = compose_with_hydra(["output_root=/scratch/me"])
    stamp = cfg.run_dir.removeprefix("/scratch/me/train/")
    assert cfg.hydra.sweep.dir == f"/scratch/me/multirun/{stamp}" and cfg.hydra.run.dir == cfg.run_dir


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_the_main_rank_writes_hydra_record_and_log(clean_env, rank):
    clean_env.setenv("RANK", rank)
    cfg = compose_with_hydra()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/runs/a"
    log = cfg.hydra.job_logging.handlers.file.filename
    if rank == "0":
        assert cfg.hydra.output_subdir == ".hydra" and log == f"/runs/a/{cfg.hydra.job.name}.log"
    else:
        assert cfg.hydra.output_subdir is None and log == os.devnull


# --- the SLURM strategy: one submitit task per GPU, environment exported before the Accelerator ---

def test_export_is_a_no_op_outside_submitit_and_single_process(clean_env):
    before = dict(os.environ)
    assert launch.export_distributed_env() == {} and dict(os.environ) == before
    assert launch.process_rank() == 0


def test_export_makes_submitit_tasks_ranks_of_one_group(clean_env):
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert launch.process_rank() == 5 and launch.main_rank_only(".hydra") is None  # before the export too
    exported = launch.export_distributed_env()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # accelerate picks cuda:LOCAL_RANK itself
    assert ("ACCELERATE_USE_CPU" in exported) != torch.cuda.is_available()  # gloo when there is no GPU


def test_slurm_gpu_launcher_composes_with_one_task_per_gpu(clean_env):
    cfg = compose_with_hydra(["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=8",
                              "hydra.launcher.partition=gpu", "hydra.sweep.dir=/tmp/sweep"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert p["gpus_per_node"] == p["tasks_per_node"] == 8 and p["partition"] == "gpu"
    assert p["timeout_min"] > 0 and p["cpus_per_task"] > 0 and p["mem_gb"] > 0 and p["nodes"] == 1
    joblib = compose_with_hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"]).hydra.launcher
    assert joblib.n_jobs == 3 and "joblib" in joblib._target_


# --- real processes (subprocesses; each well under a minute) ---

def _launch_two_ranks(*overrides, check=True):
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "train.py", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("named", [True, False], ids=["run_dir", "stamped"])
def test_two_gloo_ranks_train_one_run_in_one_directory(tmp_path, named):
    if named:
        proc = _launch_two_ranks(*SMALL, f"run_dir={tmp_path / 'run'}")
        assert [p.name for p in tmp_path.iterdir()] == ["run"]
        run = tmp_path / "run"
    else:  # the default ${run_stamp:} under a temporary output root
        proc = _launch_two_ranks(*SMALL, f"output_root={tmp_path}")
        made = list((tmp_path / "train").glob("*/*"))
        assert len(made) == 1 and [p.name for p in tmp_path.iterdir()] == ["train"], made
        run = made[0]
        assert re.search(r"-pid\d+$", run.name)
    # One process group, not two independent runs: only the main rank finishes with a model line.
    assert proc.stdout.count("model:") == 1 and f"run dir: {run}" in proc.stdout
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert (run / "train.log").is_file() and json.loads((run / "summary.json").read_text())["steps"] == 4
    images = load_run(run).generate(2)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_dp_sgd_under_two_ranks_fails_at_start_naming_the_limit(tmp_path):
    proc = _launch_two_ranks(*SMALL, "privacy=dpsgd", f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert "privacy=dpsgd runs in one process; this launch has 2 processes" in proc.stderr
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "model").exists() and not (run / "summary.json").exists()


@pytest.mark.slow
def test_joblib_sweep_names_each_run_by_its_overrides(tmp_path):
    run_script("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=smoke",
               "corruption=none,mask90", "train.steps=3", "sample.count=2", f"hydra.sweep.dir={tmp_path}",
               env={"OMP_NUM_THREADS": "1"}, timeout=300)
    made = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert made == [f"corruption={c},experiment=smoke,sample.count=2,train.steps=3" for c in ("mask90", "none")]
    for name, p in zip(made, (0.9, None)):
        assert (tmp_path / name / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        settings = ModelDir(tmp_path / name / "model").read_settings()
        assert settings["corruption"].get("p") == p


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_does_not_stop_the_sweep(tmp_path):
    from ambient.compare import compare

    proc = run_script("train.py", "-m", "experiment=smoke", "train.lr=0.002,1e30", "train.steps=3", "sample.count=0",
                      "train.checkpoint_every=0", f"hydra.sweep.dir={tmp_path}", check=False,
                      env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0 and "FloatingPointError" in proc.stderr
    ok = tmp_path / "experiment=smoke,sample.count=0,train.checkpoint_every=0,train.lr=0.002,train.steps=3"
    bad = tmp_path / "experiment=smoke,sample.count=0,train.checkpoint_every=0,train.lr=1e+30,train.steps=3"
    assert (ok / "summary.json").is_file() and (ok / "model").is_dir() and not (ok / "failed.json").exists()
    failed = json.loads((bad / "failed.json").read_text())
    assert failed["type"] == "FloatingPointError" and "train.lr=1e+30" in failed["overrides"]
    assert not (bad / "model").exists()
    rows = {r["run"]: r for r in compare([tmp_path])["rows"]}
    assert rows[ok.name]["status"] == "finished" and rows[bad.name]["status"] == "failed"
    assert "loss is nan" in rows[bad.name]["error"]


# --- sharded evaluation (issue: attacks at scale) ---

def _launch(script, *overrides, ranks=2):
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
           str(ranks), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), script, *overrides]
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_ranks_generate_the_pngs_of_one_process_and_a_killed_shard_resumes(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
    from PIL import Image

    from ambient.data import load_digits

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=2)
    DDIMPipeline(unet, DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "model")
    (tmp_path / "train").mkdir()
    for i, img in enumerate(load_digits(16).images[:6, 0].numpy()):
        Image.fromarray(img).save(tmp_path / "train" / f"{i}.png")
    args = [f"model={tmp_path / 'model'}", f"train_data={tmp_path / 'train'}", "attack.samples_per_prompt=7",
            "attack.batch_size=3", "attack.num_steps=3", "attack.min_clique=2", "attack.features=pixels"]
    from ambient.evaluation import evaluate_model
    from tests.helpers import compose

    one = compose("evaluate", [a.replace("model=", "model_path=") for a in args] + [f"out_dir={tmp_path / 'one'}"])
    evaluate_model(tmp_path / "model", tmp_path / "train", one, tmp_path / "one")  # one process, in this one
    two = _launch("evaluate.py", *args, f"out_dir={tmp_path / 'two'}")
    assert two.stdout.count("report:") == 1
    pngs = lambda run: {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / "samples").rglob("*.png"))}
    reference = pngs(tmp_path / "one")
    assert len(reference) == 14 and pngs(tmp_path / "two") == reference
    assert json.loads((tmp_path / "two" / "report.json").read_text())["counts"]["generations"] == 14
    assert sorted(p.name for p in (tmp_path / "two" / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]

    # A shard killed mid-way: its last files are missing, one is cut short. The rerun makes only those.
    samples = tmp_path / "two" / "samples"
    (samples / "class_1" / "000006.png").unlink()
    (samples / "class_0" / "000004.png").write_bytes(b"")
    kept = {p: p.stat().st_mtime_ns for p in samples.rglob("*.png") if p.stat().st_size}
    _launch("evaluate.py", *args, f"out_dir={tmp_path / 'two'}")
    assert pngs(tmp_path / "two") == reference
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (tmp_path / "two" / "report-1.json").is_file()
