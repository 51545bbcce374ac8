"""The package's contracts: import layers, one owner per fact, every config option builds."""
import ast
import hashlib
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, compose

PACKAGE = REPO / "ambient"
# Entry points -> loop/evaluation -> defenses/attack/models -> data/seeding/rundir/config.
LAYERS = {
    0: ["ambient.errors", "ambient.config", "ambient.seeding", "ambient.rundir", "ambient.launch", "ambient.images", "ambient.data",
        "ambient.canaries",
        "ambient.tracking", "ambient.checkpoints", "ambient.kernels"],
    1: ["ambient.defenses", "ambient.attack", "ambient.models", "ambient.precond", "ambient.losses",
        "ambient.samplers", "ambient.text", "ambient.pipelines", "ambient.latents", "ambient.latent_model", "ambient.lora", "ambient.pipeline", "ambient.trained",
        "ambient.card", "ambient.external", "ambient.snapshots"],
    2: ["ambient.training", "ambient.evaluation", "ambient.membership_eval", "ambient.compare", "ambient.trajectory"],
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def _imports() -> dict[str, set[str]]:
    """module -> the ambient modules it imports (top-level and inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ambient")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ambient"):
                for alias in node.names:  # `from ambient import rundir` imports the module ambient.rundir
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = {m for m in found if m != name and m != "ambient"}
    return graph


def test_every_module_has_a_layer():
    missing = [m for m in _imports() if m != "ambient" and _layer(m) is None]
    assert not missing, f"add these modules to a layer (and to README's layout): {missing}"


def test_no_module_imports_one_above_its_layer():
    bad = [(m, d) for m, deps in _imports().items() if m != "ambient"
           for d in deps if _layer(d) is not None and _layer(d) > _layer(m)]
    assert not bad, bad


def test_attack_and_defenses_stay_in_their_rooms():
    # attack/ works on tensors and callables (the trained model's public methods): it never imports
    # training, models or defenses; defenses never import the attack.
    graph = _imports()
    for module, deps in graph.items():
        if module.startswith("ambient.attack"):
            assert all(d.startswith("ambient.attack") or _layer(d) == 0 for d in deps), (module, deps)
        if module.startswith("ambient.defenses"):
            assert all(d.startswith("ambient.defenses") or _layer(d) == 0 for d in deps), (module, deps)


def test_import_graph_has_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, dep]))
            if state.get(dep) is None:
                visit(dep, path + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_config_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, ambient.config; assert 'torch' not in sys.modules, 'ambient.config imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- seeding: saved runs reproduce bit for bit

def test_stream_numbers_and_draws_never_change():
    from ambient.seeding import Stream, seeded_generator

    assert {s.name: int(s) for s in Stream} == {"MASK_A": 0, "MASK_B": 1, "NOISE": 2, "AUGMENT": 3, "SAMPLE": 10,
                                               "ORDER": 20, "POISSON": 21, "MIA": 30, "MIA_PROBE": 31,
                                               "CAPTION_TEXT": 40, "CAPTION_NOISE": 41, "NULL": 50, "INPAINT": 60,
                                               "CANARY": 70, "DUPLICATE": 80}
    # Recorded with the code that wrote the first saved runs (seeded_generator(0, 7, stream)).
    first = {Stream.MASK_A: 0.9704656004905701, Stream.MASK_B: 0.8592663407325745, Stream.SAMPLE: 0.7658006548881531,
             Stream.ORDER: 0.17346739768981934, Stream.MIA: 0.15600627660751343,
             Stream.CAPTION_NOISE: 0.3496062755584717}
    for stream, value in first.items():
        assert torch.rand(1, generator=seeded_generator(0, 7, stream)).item() == value


def test_a_training_batch_is_bit_identical_to_the_recorded_one():
    from ambient.data import load_digits
    from ambient.defenses.corruption import Augment, CorruptedImages, RandomMask
    from ambient.training import micro_batch_rows

    data = load_digits(16).select(range(30))
    batch = CorruptedImages(data, RandomMask(0.9), 0, 0.1, True, Augment(0.5, 1)).batch(torch.arange(8), 3)
    digest = {k: hashlib.sha1(v.numpy().tobytes()).hexdigest()[:16] for k, v in batch.items()}
    assert digest == {"obs": "d6bf5744f81769df", "mask": "35bbdf1793adebdd", "mask_tilde": "ced9a9d7101424dc",
                      "index": "786cc70d505bbd17"}
    assert micro_batch_rows(7, 16, 30, 0).tolist() == [3, 15, 2, 23, 22, 5, 26, 1, 21, 24, 3, 10, 8, 12, 18, 14]


def test_batches_walk_each_epochs_permutation_across_epoch_boundaries():
    """Consecutive micro-steps read every row once per epoch, in the epoch's own seeded order, also
    when a batch straddles two epochs (the one-slice fast path and the general path agree), and a
    caller mutating its rows cannot change a later batch (the cached order is not aliased)."""
    from ambient.seeding import Stream, seeded_generator
    from ambient.training import micro_batch_rows

    n, batch = 30, 8  # 30 is not a multiple of 8: every fourth batch crosses an epoch boundary
    stream = torch.cat([micro_batch_rows(step, batch, n, 5) for step in range(15)])  # 120 rows = 4 epochs
    for epoch in range(4):
        order = torch.randperm(n, generator=seeded_generator(5, epoch, Stream.ORDER))
        assert torch.equal(stream[epoch * n:(epoch + 1) * n], order)
    rows = micro_batch_rows(0, batch, n, 5)
    rows.fill_(-1)
    assert torch.equal(micro_batch_rows(0, batch, n, 5), stream[:batch])


# --- the run directory's one "never overwrite" rule

def test_free_stem_never_reuses_a_name_unless_the_content_is_the_same(tmp_path):
    from ambient.rundir import free_stem

    assert free_stem(tmp_path, "report", (".json", ".md")) == ("report", False)
    (tmp_path / "report.md").write_text("x")  # any file of the stem blocks it
    assert free_stem(tmp_path, "report", (".json", ".md")) == ("report-1", False)
    (tmp_path / "dedup.json").write_text("same")
    assert free_stem(tmp_path, "dedup", (".json",), same_text="same") == ("dedup", True)
    assert free_stem(tmp_path, "dedup", (".json",), same_text="other") == ("dedup-1", False)


# --- the report layout drives report.md, wandb and compare

def test_every_figure_of_a_real_report_is_declared_in_the_schema():
    from omegaconf import OmegaConf

    from ambient.attack import schema
    from ambient.attack.report import markdown
    from ambient.attack.run import TrainingImages, run_attack

    torch.manual_seed(0)
    train = torch.rand(12, 1, 16, 16)
    gens = {"a": torch.cat([train[:1].repeat(10, 1, 1, 1), torch.rand(5, 1, 16, 16)]), "b": torch.rand(8, 1, 16, 16)}
    cfg = compose("evaluate", ["run_dir=x", "attack.replication_thresholds=[0.5,0.8,0.95]"]).attack
    reference = {"a": torch.rand(15, 1, 16, 16), "b": torch.rand(8, 1, 16, 16)}
    report, _ = run_attack(gens, TrainingImages(train, list(range(12))), cfg, reference=reference)
    report["mia"] = {"auc": 0.5, "tpr_at_1%_fpr": 0.0, "tpr_at_0.1%_fpr": 0.0, "members": 3, "non_members": 3,
                     "timestep": 100, "draws": 1, "member_score_mean": 0.1, "non_member_score_mean": 0.1}
    from ambient.attack.semantic import semantic_quality

    labels = torch.arange(120) % 3
    report["semantic"] = semantic_quality(gens["a"], torch.rand(120, 1, 16, 16), labels, 3, torch.zeros(15).long())
    undeclared = [(s, k) for s, k, _ in schema.figures(report) if schema.field_for(s, k) is None]
    assert not undeclared, f"declare these in ambient/attack/schema.py: {undeclared}"
    flat = schema.flatten(report)
    assert flat["replication/above_0.8"] == report["replication"]["above_0.8"] and "mia/auc" in flat
    report.update(thresholds=OmegaConf.to_container(cfg), source={}, picture="p.png", picture_caption="")
    md = markdown(report)
    assert "cosine > 0.8 fraction" in md and f"ℓ2 ≤ {cfg.delta})" in md and "membership inference AUC" in md
    assert "| measure | model | null | excess |" in md and "calibrated δ" in md and "## Verdict" in md


def test_compare_columns_come_from_the_schema():
    from ambient import compare
    from ambient.attack import schema

    assert [c for c, _ in compare.REPORT_COLUMNS] == [f.column for f in schema.COLUMNS]
    assert set(c for c, _ in compare.REPORT_COLUMNS) <= set(compare.COLUMNS)


# --- every option of every config group composes and builds

def _groups() -> list[tuple[str, str]]:
    skip = {"hydra", "experiment"}
    return sorted((d.name, f.stem) for d in (REPO / "conf").iterdir() if d.is_dir() and d.name not in skip
                  for f in d.glob("*.yaml"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Local stand-ins for what some options point at: an image folder, a UNet, a pipeline."""
    from PIL import Image

    from ambient.pipelines import make_tiny_text_pipeline

    root = tmp_path_factory.mktemp("assets")
    folder = root / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(root / "unet", safe_serialization=True)
    pipeline = make_tiny_text_pipeline(root / "pipeline", resolution=16, channels=1)
    from ambient.latents import make_tiny_sd_pipeline

    latent = make_tiny_sd_pipeline(root / "latent", resolution=16, channels=1)
    return {"folder": folder, "unet": root / "unet", "pipeline": pipeline, "latent": latent}


def _overrides(group: str, option: str, assets) -> list[str]:
    extra = {
        ("dataset", "imagefolder"): [f"dataset.path={assets['folder']}"],
        ("dataset", "hf"): ["dataset.name=some-user/some-dataset"],
        ("model", "pretrained"): [f"model.path={assets['unet']}", "loss=ddpm"],
        ("model", "pipeline"): [f"model.path={assets['pipeline']}", "loss=ddpm", "text_encoder=clip",
                                f"text_encoder.path={assets['pipeline']}"],
        ("model", "latent_pipeline"): [f"model.path={assets['latent']}", "loss=ddpm", "text_encoder=clip",
                                       f"text_encoder.path={assets['latent']}"],
        ("model", "unet_text_tiny"): ["text_encoder=minilm"],
        ("text_encoder", "minilm"): ["model=unet_text_tiny"],
        ("text_encoder", "clip"): ["model=unet_text_tiny", f"text_encoder.path={assets['pipeline']}"],
        ("captions", "*"): ["model=unet_text_tiny", "text_encoder=minilm"],
        ("sampler", "ddpm"): ["loss=ddpm"],
        ("sampler", "ddpm_official"): ["loss=ddpm"],
        ("loss", "ddpm"): [],
    }
    return [f"{group}={option}", *extra.get((group, option), extra.get((group, "*"), []))]


@pytest.mark.slow
@pytest.mark.parametrize("group,option", _groups())
def test_every_option_composes_and_builds(group, option, assets, tmp_path):
    from ambient.config import validate
    from ambient.data import DataError, load_dataset, load_digits
    from ambient.defenses.captions import CaptionDefense
    from ambient.defenses.corruption import build_corruption
    from ambient.defenses.dedup import deduplicate
    from ambient.models import build_model
    from ambient.samplers import SAMPLERS
    from ambient.text import build_text_encoder
    from ambient.tracking import make_tracker
    from ambient.training import build_objective

    cfg = compose("train", _overrides(group, option, assets))
    validate(cfg)
    node = cfg[group]
    if group == "dataset":
        from ambient.data import FASHION_MNIST_DEBIAN_ROOT

        if option in ("cifar10", "hf"):  # need the network once: the offline failure must name what to do
            with pytest.raises(DataError, match="dataset.download=true|pip install"):
                load_dataset(node)
        elif option == "fashion_mnist" and not Path(FASHION_MNIST_DEBIAN_ROOT).is_dir():
            with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
                load_dataset(node)
        else:
            data = load_dataset(node)
            assert len(data) > 0 and data.images.shape[1] == node.channels
    elif group == "corruption":
        corruption = build_corruption(node)
        assert corruption.name == node.kind and corruption.label
    elif group in ("model", "loss", "text_encoder"):
        encoder = build_text_encoder(cfg.text_encoder) if cfg.text_encoder.kind != "none" else None
        pipeline = cfg.model.kind in ("pipeline", "latent_pipeline")
        channels, resolution = (4, 8) if cfg.model.kind == "latent_pipeline" else (1, 16)  # latents: 4 × 16/2
        unet = build_model(cfg.model, channels, resolution, not pipeline, 0,
                           encoder.dim if encoder is not None else None)
        net, loss, _ = build_objective(cfg, unet, not pipeline)
        assert callable(loss) and sum(p.numel() for p in net.parameters()) > 0
    elif group == "sampler":
        assert cfg.sampler.kind in SAMPLERS
    elif group == "dedup":
        kept, report = deduplicate(load_digits(16).select(range(40)), node)
        assert report["method"] == node.kind and len(kept) <= 40
    elif group == "captions":
        defense = CaptionDefense.from_config(node, ["a", "digit"], 0)
        assert defense.apply_text(["a digit"], [0], 0)
    elif group == "logger":
        tracker = make_tracker(node, tmp_path, {})
        tracker.log({"loss": 1.0}, 1)
        tracker.finish()
        assert (tmp_path / "metrics.jsonl").is_file()
    elif group == "train":
        assert cfg.train.steps >= 1


def test_a_required_value_left_out_is_named():
    from ambient.config import ConfigError, validate

    with pytest.raises(ConfigError, match="model.path"):
        validate(compose("train", ["experiment=finetune"]))


def test_every_experiment_composes_and_validates(assets):
    from ambient.config import validate

    needs = {"finetune": [f"model.path={assets['unet']}"],
             "finetune_text": [f"model.path={assets['pipeline']}", f"text_encoder.path={assets['pipeline']}",
                               "dataset=imagefolder", f"dataset.path={assets['folder']}", "dataset.channels=1"],
             "finetune_latent": [f"model.path={assets['latent']}"]}
    for path in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        validate(compose("train", [f"experiment={path.stem}", *needs.get(path.stem, [])]))


def test_every_corruption_class_is_an_allowed_kind_and_back():
    """A new corruption is one class (+ its kind in the torch-free config tuple, + a yaml): the
    builder finds classes by kind, so a class missing from CORRUPTION_KINDS, or a kind without a
    class, would let validation and building disagree."""
    from omegaconf import OmegaConf

    from ambient.config import CORRUPTION_KINDS
    from ambient.defenses.corruption import build_corruption, corruption_classes

    assert set(corruption_classes()) == set(CORRUPTION_KINDS)
    for path in sorted((REPO / "conf" / "corruption").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert type(build_corruption(cfg)).name == cfg.kind, path.name
