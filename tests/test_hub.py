"""Models by Hugging Face Hub repo id, from a local Hub server (hub_server.py) through
huggingface_hub: checked by range reads before any weight is downloaded, downloaded into the
shared cache once, offline from that cache, every failure one line."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")
import huggingface_hub.constants as hub_constants  # noqa: E402

from hub_server import TOKEN, LocalHub  # noqa: E402
from mergealign_fast import MergeError, PlanError, merge_checkpoints, run_config  # noqa: E402
from mergealign_fast.io import readers  # noqa: E402
from mergealign_fast.io.checkpoint import open_checkpoint, read_elements  # noqa: E402
from mergealign_fast.output.manifest import (plan_fingerprint, read_manifest,  # noqa: E402
                                             verify_output)
from mergealign_fast.plan import plan_merge  # noqa: E402
from mergealign_fast.sources import hub as hub_source  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_TINY, write_synthetic_model  # noqa: E402

ROLES = ("base", "domain", "aligned")


def forget_resolved() -> None:
    """A fresh process's view: no repo resolved, no Hub file registered."""
    hub_source._SNAPSHOTS.clear()
    readers._FROM_THE_HUB.clear()


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    server = LocalHub()
    endpoint = server.start()
    # What HF_ENDPOINT sets when huggingface_hub is imported (its URL template is made then).
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    forget_resolved()
    yield server
    forget_resolved()
    server.stop()


@pytest.fixture
def published(local_hub, tiny_trio, tmp_path):
    """The tiny trio as repos test/base, test/domain, test/aligned; the aligned one with a chat
    template, a merges.txt and remote code beside its weights."""
    aligned = tmp_path / "aligned-src"
    shutil.copytree(tiny_trio["aligned"], aligned)
    (aligned / "chat_template.jinja").write_text("{{ messages }}")
    (aligned / "merges.txt").write_text("#version: 0.2\n")
    (aligned / "modeling_tiny.py").write_text("# remote code\n")
    config = json.loads((aligned / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (aligned / "config.json").write_text(json.dumps(config))
    folders = {**tiny_trio, "aligned": aligned}
    commits = {role: local_hub.add_repo(f"test/{role}", folders[role]) for role in ROLES}
    return folders, commits


def tensors_of(folder: Path) -> dict:
    return {n: read_elements(loc).tobytes() for n, loc in open_checkpoint(folder).tensors.items()}


def weight_bytes_sent(hub: LocalHub) -> dict:
    return {key: n for key, n in hub.bytes_sent.items() if key[1].endswith(".safetensors")}


def test_a_merge_of_hub_repos_is_the_merge_of_the_folders(published, local_hub, tmp_path):
    folders, commits = published
    merge_checkpoints(*folders.values(), tmp_path / "local", fsync=False)
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "hub", fsync=False)
    assert tensors_of(tmp_path / "hub") == tensors_of(tmp_path / "local")
    assert verify_output(tmp_path / "hub") == []
    recorded = read_manifest(tmp_path / "hub")["inputs"]
    assert {r: recorded[r]["commit"] for r in ROLES} == commits
    assert recorded["domain"]["repo"] == "test/domain"
    # The aligned repo's chat template and remote code came down, beside its tokenizer files.
    cached = Path(hub_constants.HF_HUB_CACHE) / "models--test--aligned" / "snapshots" / \
        commits["aligned"]
    for name in ("chat_template.jinja", "merges.txt", "modeling_tiny.py"):
        assert (cached / name).is_file(), name


def test_the_plan_reads_headers_only_and_a_second_merge_downloads_nothing(
        published, local_hub, tmp_path):
    plan_merge("test/base", "test/domain", "test/aligned", tmp_path / "out")
    sizes = {role: (published[0][role] / "model.safetensors").stat().st_size for role in ROLES}
    for (repo, _), sent in weight_bytes_sent(local_hub).items():
        assert sent <= hub_source.RANGE_BLOCK < sizes[repo.split("/")[1]], repo
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out",
                      fsync=False)
    after_first = dict(local_hub.bytes_sent)
    forget_resolved()  # a new process: the cache, not the server, has the weights
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "again",
                      fsync=False)
    assert weight_bytes_sent(local_hub) == {k: n for k, n in after_first.items()
                                            if k[1].endswith(".safetensors")}


def test_a_problem_found_by_the_plan_downloads_no_weight(local_hub, tiny_trio, tmp_path):
    deeper = write_synthetic_model(tmp_path / "deeper", replace(LLAMA_TINY, layers=3), "domain")
    for role in ("base", "aligned"):
        local_hub.add_repo(f"test/{role}", tiny_trio[role])
    local_hub.add_repo("test/deeper", deeper)
    with pytest.raises(PlanError, match="model.layers.2.* in domain .* not in base"):
        merge_checkpoints("test/base", "test/deeper", "test/aligned", tmp_path / "out",
                          fsync=False)
    assert weight_bytes_sent(local_hub)
    assert all(n <= hub_source.RANGE_BLOCK for n in weight_bytes_sent(local_hub).values())
    assert not (tmp_path / "out").exists()


def test_revisions_branches_and_pinned_commits(local_hub, tiny_trio, tmp_path):
    first = local_hub.add_repo("test/model", tiny_trio["domain"])
    second = local_hub.add_repo("test/model", tiny_trio["aligned"], revision="v2")
    local_hub.add_repo("test/base", tiny_trio["base"])
    local_hub.add_repo("test/aligned", tiny_trio["aligned"])
    for spec, commit, expected in [("test/model", first, "domain"),
                                   ("test/model@v2", second, "aligned"),
                                   (f"test/model@{first}", first, "domain")]:
        out = tmp_path / spec.replace("/", "_")
        merge_checkpoints("test/base", spec, "test/aligned", out, fsync=False)
        assert read_manifest(out)["inputs"]["domain"]["commit"] == commit
        reference = tmp_path / f"ref-{expected}"
        if not reference.exists():
            merge_checkpoints(tiny_trio["base"], tiny_trio[expected], tiny_trio["aligned"],
                              reference, fsync=False)
        assert tensors_of(out) == tensors_of(reference), spec


def test_a_local_folder_of_the_same_name_wins(published, local_hub, tmp_path, monkeypatch):
    folders, _ = published
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders["aligned"], tmp_path / "test" / "domain")  # "test/domain" is local
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out",
                      fsync=False)
    assert "repo" not in read_manifest(tmp_path / "out")["inputs"]["domain"]


def test_every_repo_problem_is_one_line_and_all_are_listed(local_hub, tiny_trio, tmp_path):
    local_hub.add_repo("test/base", tiny_trio["base"])
    local_hub.add_repo("test/gated", tiny_trio["domain"], gated=True)
    with pytest.raises(PlanError) as info:
        merge_checkpoints("test/base@nope", "test/gated", "test/missing", tmp_path / "out")
    lines = info.value.problems
    assert any(line.startswith("base: test/base@nope: the repo has no such revision")
               for line in lines), lines
    assert any(line.startswith("domain: test/gated: a gated repo") and "HF_TOKEN" in line
               for line in lines), lines
    assert any(line.startswith("aligned: test/missing: no such local folder, and no model "
                               "repo") for line in lines), lines
    assert not local_hub.bytes_sent, "nothing is downloaded when a repo is refused"


def test_a_missing_repo_and_a_broken_local_model_are_reported_together(local_hub, tiny_trio,
                                                                        tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_trio["aligned"], broken)
    (broken / "model.safetensors").write_bytes(b"\x10")
    local_hub.add_repo("test/base", tiny_trio["base"])
    with pytest.raises(PlanError) as info:
        merge_checkpoints("test/base", "test/missing", broken, tmp_path / "out")
    assert [line.split(":")[0] for line in info.value.problems] == ["domain", "aligned"]


def test_a_gated_repo_with_a_token(local_hub, tiny_trio, tmp_path, monkeypatch):
    for role in ROLES:
        local_hub.add_repo(f"test/{role}", tiny_trio[role], gated=role == "domain")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out", fsync=False)
    assert verify_output(tmp_path / "out") == []


def test_offline_from_the_cache_huggingface_hub_filled(published, local_hub, tmp_path,
                                                       monkeypatch):
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "online",
                      fsync=False)
    local_hub.stop()
    forget_resolved()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "offline",
                      fsync=False)
    assert tensors_of(tmp_path / "offline") == tensors_of(tmp_path / "online")
    forget_resolved()
    with pytest.raises(PlanError, match=r"domain: test/domain@v9: not in the Hub cache .* "
                                        "HF_HUB_OFFLINE is set"):
        merge_checkpoints("test/base", "test/domain@v9", "test/aligned", tmp_path / "x")
    snapshot = next((Path(hub_constants.HF_HUB_CACHE) / "models--test--domain" / "snapshots")
                    .iterdir())
    (snapshot / "model.safetensors").unlink()  # a cache file removed
    forget_resolved()
    with pytest.raises(PlanError, match=r"domain: test/domain: its weights are not in the Hub "
                                        r"cache .* HF_HUB_OFFLINE is set"):
        merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "y")


@pytest.mark.slow
def test_a_download_cut_off_is_retried(published, local_hub, tmp_path):
    key = ("test/domain", "model.safetensors")
    local_hub.cut_after[key] = [100_000, 1]  # huggingface_hub resumes it by itself
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out", fsync=False)
    assert verify_output(tmp_path / "out") == []
    assert local_hub.gets[key] >= 3  # the header's range read, the cut GET, the resumed one


@pytest.mark.slow
def test_a_download_that_keeps_failing_is_retried_by_the_next_run(published, local_hub, tmp_path):
    key = ("test/domain", "model.safetensors")
    local_hub.cut_after[key] = [50_000, 100]
    with pytest.raises(MergeError, match="test/domain: downloading model.safetensors failed .*"
                                         "run the same command again"):
        merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out",
                          fsync=False)
    assert not (tmp_path / "out").exists()
    local_hub.cut_after.clear()
    downloads = dict(local_hub.gets_without_range)
    forget_resolved()
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out", fsync=False)
    assert verify_output(tmp_path / "out") == []
    # The files that came down whole stay in the cache: only the cut one is fetched again.
    again = {k: n - downloads.get(k, 0) for k, n in local_hub.gets_without_range.items()
             if n - downloads.get(k, 0)}
    assert again == {key: 1}


def test_a_corrupted_download_is_caught_by_its_hash_and_removed(published, local_hub,
                                                                 tmp_path):
    local_hub.corrupt[("test/domain", "model.safetensors")] = True
    with pytest.raises(MergeError, match="the download of model.safetensors is corrupt .*sha256"):
        merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out",
                          fsync=False)
    snapshot = Path(hub_constants.HF_HUB_CACHE) / "models--test--domain" / "snapshots"
    assert not list(snapshot.glob("*/model.safetensors")), "the bad file stays in the cache"
    local_hub.corrupt.clear()
    forget_resolved()
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out", fsync=False)
    assert verify_output(tmp_path / "out") == []


def test_the_disk_check_counts_the_downloads(published, local_hub, tmp_path, monkeypatch):
    import mergealign_fast.plan.output as output_checks

    out_bytes = plan_merge("test/base", "test/domain", "test/aligned",
                           tmp_path / "out").output_bytes
    real = shutil.disk_usage

    def tight(path):  # room for OUT and the headroom, not for the downloads as well
        usage = real(path)
        return usage._replace(free=out_bytes + output_checks.DISK_HEADROOM_BYTES + 1)
    monkeypatch.setattr(output_checks.shutil, "disk_usage", tight)
    with pytest.raises(PlanError, match="not enough free disk .*downloads into"):
        merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out")
    assert not [k for k in local_hub.gets_without_range if k[1].endswith(".safetensors")], \
        "no weight was downloaded"


def test_resume_knows_hub_inputs_before_and_after_download(published, local_hub, tmp_path):
    plan = plan_merge("test/base", "test/domain", "test/aligned", tmp_path / "out")
    before = plan_fingerprint(plan)
    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out", fsync=False)
    forget_resolved()
    again = plan_merge("test/base", "test/domain", "test/aligned", tmp_path / "out2")
    assert plan_fingerprint(again) == before
    result = merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "out",
                               fsync=False, resume=True)
    assert result.already_complete


def test_a_mergekit_config_with_hub_ids(published, local_hub, tmp_path):
    folders, _ = published
    text = ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            "  - model: {domain}\n    parameters: {{weight: 0.7}}\n"
            "  - model: {aligned}\n    parameters: {{weight: 0.3}}\ndtype: bfloat16\n")
    (tmp_path / "hub.yml").write_text(text.format(base="test/base", domain="test/domain",
                                                  aligned="test/aligned"))
    (tmp_path / "local.yml").write_text(text.format(**{r: folders[r] for r in ROLES}))
    run_config(tmp_path / "hub.yml", tmp_path / "from_hub", fsync=False)
    run_config(tmp_path / "local.yml", tmp_path / "from_local", fsync=False)
    assert tensors_of(tmp_path / "from_hub") == tensors_of(tmp_path / "from_local")


def test_a_bin_repo_is_planned_from_its_zip_directory(local_hub, tmp_path):
    torch = pytest.importorskip("torch")
    from mergealign_fast.io.torch_bin import read_bin
    from mergealign_fast.sources import model_folder

    folder = tmp_path / "bin-model"
    folder.mkdir()
    state = {f"model.layers.{i}.mlp.weight": torch.randn(256, 1024) for i in range(8)}
    torch.save(state, folder / "pytorch_model.bin")
    local_hub.add_repo("test/bin", folder)
    found = open_checkpoint(model_folder("test/bin")).tensors
    local = read_bin(folder / "pytorch_model.bin")
    assert {n: loc.entry for n, loc in found.items()} == \
        {n: e for n, e in local.items()}
    size = (folder / "pytorch_model.bin").stat().st_size
    assert local_hub.sent_for("test/bin", ".bin") < size // 50  # 8 MB file: under 160 KB


@pytest.mark.slow
def test_a_merge_with_a_bin_repo(local_hub, tiny_trio, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    folder = tmp_path / "bin-domain"
    folder.mkdir()
    shutil.copy(tiny_trio["domain"] / "config.json", folder)
    torch.save(load_file(tiny_trio["domain"] / "model.safetensors"),
               folder / "pytorch_model.bin")
    for role in ("base", "aligned"):
        local_hub.add_repo(f"test/{role}", tiny_trio[role])
    local_hub.add_repo("test/bin", folder)
    merge_checkpoints("test/base", "test/bin", "test/aligned", tmp_path / "out", fsync=False)
    merge_checkpoints(*tiny_trio.values(), tmp_path / "local", fsync=False)
    assert tensors_of(tmp_path / "out") == tensors_of(tmp_path / "local")


def cli_with_the_hub(tmp_path: Path, *args, cache: str = "cli-cache"):
    """`mergealign-fast args` in a new process that finds the local Hub through HF_ENDPOINT
    and keeps its cache in HF_HUB_CACHE, as a user's shell would set them."""
    env = {**os.environ, "HF_ENDPOINT": hub_constants.ENDPOINT,
           "HF_HUB_CACHE": str(tmp_path / cache)}
    return subprocess.run([sys.executable, "-m", "mergealign_fast", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_the_cli_with_hub_ids_and_the_environment(published, local_hub, tmp_path):
    done = cli_with_the_hub(tmp_path, "merge", "test/base", "test/domain", "test/aligned",
                            "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "downloading 3 files" in done.stderr
    assert (tmp_path / "cli-cache" / "models--test--domain").is_dir()
    done = cli_with_the_hub(tmp_path, "merge", "test/base", "test/nothing", "test/aligned",
                            "-o", tmp_path / "out2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "domain: test/nothing: no such local folder, and no model repo" in done.stderr
    done = cli_with_the_hub(tmp_path, "merge", "test/base", "test/domain", "test/aligned",
                            "-o", tmp_path / "quiet", "--quiet", cache="quiet-cache")
    assert done.returncode == 0 and done.stderr == "", done.stderr  # downloaded in silence
    assert (tmp_path / "quiet-cache" / "models--test--domain" / "blobs").is_dir()


@pytest.mark.slow
def test_check_reports_the_plan_and_differences_without_downloading(local_hub, tiny_trio,
                                                                    tmp_path):
    domain = tmp_path / "domain-src"
    shutil.copytree(tiny_trio["domain"], domain)
    config = json.loads((domain / "config.json").read_text())
    config["rope_theta"] = 500000.0
    (domain / "config.json").write_text(json.dumps(config))
    for role, folder in {**tiny_trio, "domain": domain}.items():
        local_hub.add_repo(f"test/{role}", folder)
    done = cli_with_the_hub(tmp_path, "check", "test/base", "test/domain", "test/aligned",
                            "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    report = done.stdout.splitlines()
    assert any(line.startswith("* rope_theta") and "500000.0" in line for line in report)
    assert any(line.startswith("  num_hidden_layers") for line in report)
    assert "KB to download" in done.stdout and "KB first" in done.stdout
    assert report[-1] == "check: no problems: the merge can run"
    assert not [k for k in local_hub.gets_without_range if k[1].endswith(".safetensors")]
    assert not (tmp_path / "out").exists()
    done = cli_with_the_hub(tmp_path, "check", "test/base", "test/domain@nope", "test/aligned")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "domain: test/domain@nope: the repo has no such revision" in done.stderr
    assert done.stdout.splitlines()[-1].startswith("check: 1 problems")


def test_inspect_and_sweep_take_hub_ids(published, local_hub, tmp_path):
    from mergealign_fast import sweep_checkpoints
    from mergealign_fast.tools.inspect_vectors import inspect_checkpoints

    folders, _ = published
    hub_view = inspect_checkpoints("test/base", "test/domain", "test/aligned")
    local_view = inspect_checkpoints(*folders.values())
    assert hub_view.tensors == local_view.tensors
    results = sweep_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "sweep",
                                [0.25, 0.75], fsync=False)
    assert [verify_output(r.out_dir) for r in results] == [[], []]


def test_cache_files_removed_between_plan_and_merge_come_down_again(published, local_hub,
                                                                     tmp_path):
    from mergealign_fast.engine.loop import execute

    merge_checkpoints("test/base", "test/domain", "test/aligned", tmp_path / "first",
                      fsync=False)
    forget_resolved()
    plan = plan_merge("test/base", "test/domain", "test/aligned", tmp_path / "second")
    snapshot = next((Path(hub_constants.HF_HUB_CACHE) / "models--test--domain" / "snapshots")
                    .iterdir())
    (snapshot / "model.safetensors").resolve().unlink()  # the blob, then the dangling link
    (snapshot / "model.safetensors").unlink()
    downloads = local_hub.gets_without_range[("test/domain", "model.safetensors")]
    execute(plan)
    assert local_hub.gets_without_range[("test/domain", "model.safetensors")] == downloads + 1
    assert tensors_of(tmp_path / "second") == tensors_of(tmp_path / "first")
