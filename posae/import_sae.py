"""`python -m posae.import_sae`: a run folder for an SAE posae did not train (a SAELens
folder, or a published SAE by SAELens release and id), evaluated by posae's families on a
cache of the matching model and layer, as a trained run is (docs/metrics.md).

    python -m posae.import_sae source=path/to/saelens_folder layer=3
    python -m posae.import_sae release=gemma-scope-2b-pt-res-canonical \\
        sae_id=layer_12/width_16k/canonical model=gemma-2-2b layer=12 scale=paper

The folder (hydra.run.dir, under outputs/imports/ by default) holds run_config.yaml and
`sae/` (the SAE, posae's provenance beside its SAELens config), then metrics.json and
plots/ when eval.enabled; `python -m posae.evaluate run_dir=<it>` evaluates it again.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from posae.cli import CONFIG_PATH, exit_on_user_error, log
from posae.config import ConfigError, cache_request, eval_config, trainer_config
from posae.data.cache_format import CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.cache_writer import build_cache
from posae.eval.inputs import RUN_CONFIG
from posae.evaluate import evaluate_logged
from posae.sae import SAE, load_sae, read_saved, save_sae
from posae.sae.saelens import hook_layer, import_pretrained
from posae.training.batches import held_out_split, split_fingerprint


def read_source(cfg: DictConfig) -> tuple[SAE, dict, str]:
    """(SAE, its cfg.json record, where it came from) of `source` or `release`/`sae_id`."""
    if bool(cfg.source) == bool(cfg.release or cfg.sae_id):
        raise ConfigError("source: give either source=<a SAELens folder> or release=<SAELens "
                          "release> sae_id=<its id>, not both, not neither")
    if cfg.source:
        folder = Path(cfg.source)
        return load_sae(folder), read_saved(folder)[0], str(folder)
    if not (cfg.release and cfg.sae_id):
        raise ConfigError("release, sae_id: a published SAE needs both")
    sae, record = import_pretrained(cfg.release, cfg.sae_id)
    return sae, record, f"{cfg.release}/{cfg.sae_id}"


def check_matches(sae: SAE, record: dict, origin: str, layer: int, d_model: int,
                  model_names: tuple[str, ...] = ()) -> None:
    """The SAE reads the cached activations: its width is the model's, its hook (if it
    names one) is the residual stream after block `layer`, and it was not trained on
    centred TransformerLens weights; a model name other than `model_names` is warned of
    (names differ between libraries)."""
    if sae.cfg.d_in != d_model:
        raise ConfigError(f"source: {origin} reads d_in={sae.cfg.d_in}, but model.d_model is "
                          f"{d_model}; choose the model it was trained on")
    meta = record.get("metadata") or {}
    if (meta.get("model_from_pretrained_kwargs") or {}).get("center_writing_weights"):
        raise ConfigError(f"source: {origin} was trained on TransformerLens activations with "
                          f"center_writing_weights=true, not the model's own residual stream, "
                          f"which posae caches")
    hook = meta.get("hook_name") or record.get("hook_name") or record.get("hook_point")
    if hook is None:
        log.warning("%s names no hook_name: trusting layer=%d", origin, layer)
        return
    if hook_layer(hook) is None:
        raise ConfigError(f"source: {origin} reads {hook!r}; posae caches the residual stream "
                          f"after a block (blocks.L.hook_resid_post) only")
    if hook_layer(hook) != layer:
        raise ConfigError(f"layer={layer}: {origin} reads {hook!r}, which is layer "
                          f"{hook_layer(hook)} here")
    trained_on = meta.get("model_name")
    if trained_on and model_names and trained_on not in model_names:
        log.warning("%s was trained on model %r, evaluated here on %s: check they are the "
                    "same model", origin, trained_on, " / ".join(model_names))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="import_sae")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    taken = [name for name in ("sae", RUN_CONFIG, "train_summary.json", "checkpoints")
             if (run_dir / name).exists()]
    if taken:
        raise ConfigError(f"hydra.run.dir: {run_dir} already holds a run ({', '.join(taken)}); "
                          f"choose another folder")
    req = cache_request(cfg, "layer")
    trainer = trainer_config(cfg.trainer, req.context_size)
    ecfg = eval_config(cfg.eval)
    sae, record, origin = read_source(cfg)
    layer = req.layers[0]
    check_matches(sae, record, origin, layer, req.model.d_model,
                  (req.model.name, req.model.hf_id))
    build_cache(req)
    cache = ActivationCache.open(CacheSpec.from_request(req), layer, verify=False)
    _, eval_ids = held_out_split(cache, req.dataset.pack, trainer.eval_fraction)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / RUN_CONFIG, resolve=True)
    provenance = {"model": {"name": req.model.name, "hf_id": req.model.hf_id}, "layer": layer,
                  "hook": cache.manifest["hook"], "context_size": req.context_size,
                  "prepend_bos": req.model.prepend_bos, "dataset": req.dataset.name,
                  "cache": str(cache.dir), "train_on_special_tokens":
                  trainer.train_on_special_tokens, "held_out_split": split_fingerprint(eval_ids),
                  "imported_from": origin}
    save_sae(sae, run_dir / "sae", provenance)
    (run_dir / "sae" / "imported_cfg.json").write_text(json.dumps(record, indent=1, default=str))
    log.info("imported %s (%s, %d latents) into %s", origin, sae.cfg.name, sae.cfg.d_sae,
             run_dir)
    if ecfg.enabled:
        evaluate_logged(cfg, run_dir)


if __name__ == "__main__":
    main()
