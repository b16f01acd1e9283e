"""`python -m posae.push run_dir=... repo_id=...`: share a run's SAE on the Hugging Face Hub.

    python -m posae.push run_dir=outputs/runs/2026-12-02/10-00-00_minilm_L3_topk repo_id=me/saes
    python -m posae.push run_dir=... repo_id=me/saes dry_run=true     # stage only, no upload

The upload holds the SAE folder (the SAELens format: sae-lens loads it by repo id and
path, posae by `load_sae`), its metrics, config and plots under `<sae_id>/`, and a model
card (README.md, at the repository's root unless it has one, and in `<sae_id>/`) with
the numbers, the config, the plots and how to load it. It is staged
in `<run_dir>/hub_upload/` first; the run's own files are only read.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from posae.cli import CONFIG_PATH, exit_on_user_error, log
from posae.config import ConfigError
from posae.sae import load_sae, read_saved, save_sae
from posae.sae.saelens import OWN_PREFIX

STAGING = "hub_upload"
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
SAE_ID = re.compile(r"[\w.-]+(/[\w.-]+)*")
# run files uploaded beside the SAE, when the run has them
RUN_FILES = ("metrics.json", "train_summary.json", "run_config.yaml")
# what save_sae writes itself, beside the provenance
SAE_KEYS = {"architecture", "format_version", "config", "scalars"}
CORE = ("explained_variance", "l0", "mse", "cosine_similarity", "dead_fraction")


def default_sae_id(posae: dict) -> str:
    """<model>_L<layer>_<variant>, e.g. minilm_L3_topk."""
    model = (posae.get("model") or {}).get("name", "model")
    return f"{model}_L{posae.get('layer', 'x')}_{posae['config']['name']}"


def stage_upload(run_dir: Path, repo_id: str, sae_id: str | None) -> tuple[Path, str]:
    """Write the upload into `run_dir/hub_upload/` (replacing a previous staging): the
    model card and `<sae_id>/` (the SAE folder, the run's metrics, config and plots).
    Returns (the staged folder, sae_id). ConfigError for a bad repo id, sae id or folder."""
    if not REPO_ID.fullmatch(repo_id or ""):
        raise ConfigError(f"repo_id: {repo_id!r} is not a Hub repository id (owner/name)")
    _, posae = read_saved(run_dir / "sae")
    if not posae:
        raise ConfigError(f"run_dir: {run_dir}/sae was not written by posae (no "
                          f"metadata.posae in cfg.json); import it first (posae.import_sae)")
    sae_id = sae_id or default_sae_id(posae)
    if not SAE_ID.fullmatch(sae_id) or ".." in sae_id.split("/"):
        raise ConfigError(f"sae_id: {sae_id!r} is not a folder path in the repository")
    stage = run_dir / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    target = stage / sae_id
    target.mkdir(parents=True)
    # written again, so that a folder saved before the SAELens format is uploaded in it
    provenance = {k: v for k, v in posae.items() if k not in SAE_KEYS}
    save_sae(load_sae(run_dir / "sae"), target, provenance)
    record, posae = read_saved(target)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, target / name)
    if (run_dir / "plots").is_dir():
        shutil.copytree(run_dir / "plots", target / "plots")
    (stage / "README.md").write_text(model_card(run_dir, record, posae, repo_id, sae_id,
                                                f"{sae_id}/"))
    (target / "README.md").write_text(model_card(run_dir, record, posae, repo_id, sae_id, ""))
    return stage, sae_id


def model_card(run_dir: Path, record: dict, posae: dict, repo_id: str, sae_id: str,
               here: str) -> str:
    """README.md of the upload: Hub metadata, what the SAE is, its held-out numbers, config,
    plots, provenance, and how to load it with SAELens and with posae. `here`: the path from
    the card's folder to the SAE's ("<sae_id>/" at the root, "" beside it)."""
    cfg = posae["config"]
    model = posae.get("model") or {}
    metrics = read_json(run_dir / "metrics.json")
    summary = read_json(run_dir / "train_summary.json")
    front = {"library_name": "saelens", "tags": ["sparse-autoencoder", "posae", "saelens"]}
    if model.get("hf_id"):
        front["base_model"] = model["hf_id"]
    loads_in_saelens = not record["architecture"].startswith(OWN_PREFIX)
    origin_verb = "imported into" if posae.get("imported_from") else "trained with"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {cfg['name']} SAE · {model.get('name', '?')} layer {posae.get('layer', '?')}",
             "", f"A sparse autoencoder {origin_verb} posae, on the residual stream after "
             f"block {posae.get('layer', '?')} of "
             f"`{model.get('hf_id') or model.get('name')}` "
             f"(`{record.get('metadata', {}).get('hook_name', '?')}`).", "",
             "| | |", "|---|---|",
             f"| posae architecture | `{posae['architecture']}` |",
             f"| SAELens architecture | `{record['architecture']}` |",
             f"| width (d_sae) | {record['d_sae']} |", f"| d_in | {record['d_in']} |",
             f"| context size | {posae.get('context_size', '?')} |",
             f"| dataset | {posae.get('dataset', '?')} |"]
    if summary:
        lines.append(f"| training tokens | {summary.get('tokens', '?'):,} |")
    core = (metrics or {}).get("core") or (summary or {}).get("held_out") or {}
    lines += [f"| held-out {name.replace('_', ' ')} | {core[name]:.4g} |"
              for name in CORE if isinstance(core.get(name), (int, float))]
    lines += ["", "## Load it", "", "```python"]
    if loads_in_saelens:
        lines += ["from sae_lens import SAE", "",
                  f'sae = SAE.from_pretrained("{repo_id}", "{sae_id}")', "", "# or with posae:"]
    lines += ["from pathlib import Path", "from huggingface_hub import snapshot_download",
              "from posae.sae import load_sae", "",
              f'folder = snapshot_download("{repo_id}", allow_patterns="{sae_id}/*")',
              f'sae = load_sae(Path(folder) / "{sae_id}")', "```", ""]
    if not loads_in_saelens:
        lines += [f"`{posae['architecture']}` is a posae architecture: sae-lens does not know "
                  f"it, posae loads it.", ""]
    lines += ["## Config", "", "The SAE's own config (the run's full config is "
              f"`{here}run_config.yaml`):", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({here}plots/{p.name})" for p in plots]
        lines.append("")
    origin = (summary or {}).get("provenance") or {}
    if origin or posae.get("imported_from"):
        lines += ["## Provenance", ""]
        if posae.get("imported_from"):
            lines.append(f"- imported from {posae['imported_from']} (posae.import_sae)")
        for key in ("commit", "dirty", "torch", "device", "cpu"):
            if key in origin:
                lines.append(f"- {key}: {origin[key]}")
        lines.append("")
    return "\n".join(lines)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def upload(stage: Path, repo_id: str, private: bool, sae_id: str) -> str:
    """Create the repository if needed and upload the staged folder; its URL. The card
    becomes the repository's README.md only if it has none (another SAE's); it is always
    `<sae_id>/README.md`."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    keep_readme = api.file_exists(repo_id, "README.md")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(stage),
                             commit_message=f"posae: add {sae_id}",
                             ignore_patterns=["README.md"] if keep_readme else None)
    return str(getattr(info, "commit_url", info))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="push")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    stage, sae_id = stage_upload(run_dir, cfg.repo_id, cfg.sae_id)
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    log.info("staged %d files in %s: %s", len(files), stage, ", ".join(files))
    if cfg.dry_run:
        log.info("dry_run: nothing uploaded")
        return
    try:
        url = upload(stage, cfg.repo_id, cfg.private, sae_id)
    except Exception as err:  # network, authentication, offline mode: the Hub's own errors
        log.error("upload to %s failed (%s: %s); the staged files are in %s", cfg.repo_id,
                  type(err).__name__, str(err).splitlines()[0] if str(err) else "", stage)
        sys.exit(1)
    log.info("uploaded %s to %s: %s", sae_id, cfg.repo_id, url)


if __name__ == "__main__":
    main()
