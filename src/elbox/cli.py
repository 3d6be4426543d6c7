"""``elbox train | sample | evaluate``: the command line, generated from the config dataclasses.

Every flag comes from a field of a dataclass in ``elbox.config`` (name, type, choices, default and help text), so
nothing is written twice. A user's mistake is reported on one line (``elbox: error: ...``) with exit status 2.
A training run stopped by SIGINT/SIGTERM saves a checkpoint and exits with 130/143 (128 + the signal's number).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from elbox.config import (
    MODELS,
    DataConfig,
    EvaluateConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    build_dataclass,
    load_run_config,
    run_config_from_dict,
)
from elbox.errors import UserError, a_model
from elbox.typecheck import field_types, unwrap_optional

PROG = "elbox"


#: spellings users type for a flag elbox names otherwise (other libraries' names)
ALIASES = {
    "--learning-rate": "--lr", "--learning_rate": "--lr", "--max-steps": "--steps", "--num-steps": "--steps",
    "--iterations": "--steps", "--train-steps": "--steps", "--batch": "--batch-size", "--bs": "--batch-size",
    "--train-batch-size": "--batch-size", "--diffusion-steps": "--timesteps", "--num-timesteps": "--timesteps",
    "--num-train-timesteps": "--timesteps", "--output": "--out", "--output-dir": "--out", "--outdir": "--out",
    "--dataset": "--data", "--data-path": "--data", "--n-samples": "--num", "--num-samples": "--num",
    "--ddim-steps": "--sampling-steps", "--num-inference-steps": "--sampling-steps", "--latent-size": "--latent-dim",
    "--z-dim": "--latent-dim", "--ema": "--ema-decay", "--gpu": "--device", "--fp16": "--precision",
    "--bf16": "--precision", "--mixed-precision": "--precision",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the flag, with the nearest valid flag suggested (or the model
    the flag belongs to, or elbox's name for another library's spelling)."""

    #: flags of the other models' configs -> the model (set by the train command's parser)
    other_models: dict[str, list[str]] = {}

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            known = [s for a in self._actions for s in a.option_strings]
            flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
            if flags:
                flag = flags[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if flag in self.other_models:
                    models = self.other_models[flag]
                    which = f"{' and '.join(models)} model{'s' if len(models) > 1 else ''}"
                    message = f"{flag} is a flag of the {which}: `elbox train {models[0]} {flag} ...`"
                elif ALIASES.get(flag) in known:
                    message = f"unknown flag {flag}; elbox calls it {ALIASES[flag]}"
                else:
                    hint = f"; did you mean {close[0]}?" if close else f"; see `{self.prog} --help`"
                    message = f"unknown flag {flag}{hint}"
            else:
                what = repr(unknown[0]) if unknown else "an empty argument ''"
                model = difflib.get_close_matches(unknown[0].lower(), list(MODELS), n=1, cutoff=0.6) if unknown else []
                if self.prog.startswith(f"{PROG} train") and unknown and unknown[0] in MODELS:  # after a flag
                    message = f"the model comes first: `elbox train {unknown[0]} [flags]`"
                elif self.prog.startswith(f"{PROG} train") and model:  # `elbox train ddmp`
                    message = f"unknown model {what}; did you mean {model[0]}? (models: {', '.join(MODELS)})"
                else:
                    message = f"unexpected argument {what}; see `{self.prog} --help`"
        raise UserError(f"{self.prog}: {message}")


# ------------------------------------------------------------------------------------ dataclass -> flags
def _field_help(cls: type) -> dict[str, str]:
    """The comment after each field in the dataclass's source: the flag's help text."""
    import inspect

    out = {}
    lines = []
    for klass in reversed(cls.__mro__):  # a config that extends another (LDMConfig) keeps the parent's help
        if dataclasses.is_dataclass(klass):
            try:
                lines += inspect.getsource(klass).splitlines()
            except OSError:
                pass
    for line in lines:
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", '"')):
            name = stripped.split(":", 1)[0].strip()
            out[name] = stripped.split("#", 1)[1].strip()
    return out


def _converter(tp: Any, flag: str):
    inner, optional = unwrap_optional(tp)

    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return inner(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(inner, inner.__name__)
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None

    convert.__name__ = getattr(inner, "__name__", "value")
    return convert


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, dest_prefix: str, title: str) -> None:
    """One flag per field: --field-name, typed, with choices for Literals and --x/--no-x for booleans.

    Flags default to SUPPRESS so that only the flags a user gave override the defaults or a --config file.
    """
    group = parser.add_argument_group(title)
    helps = _field_help(cls)
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in dataclasses.fields(cls)}
    for name, tp in field_types(cls).items():
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        help_text = helps.get(name, "")
        if "(default:" not in help_text:  # a comment may say what an unset value means, in its own words
            help_text += f" (default: {'none' if default is None else default})"
        kwargs: dict[str, Any] = {"dest": f"{dest_prefix}.{name}", "default": argparse.SUPPRESS, "help": help_text}
        inner, _ = unwrap_optional(tp)
        if inner is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(inner) is Literal:
            group.add_argument(flag, choices=list(get_args(inner)), metavar="{" + ",".join(get_args(inner)) + "}", **kwargs)
        elif get_origin(inner) is tuple:
            group.add_argument(flag, nargs="+", type=_converter(get_args(inner)[0], flag), metavar="N", **kwargs)
        else:
            group.add_argument(flag, type=_converter(tp, flag), metavar=getattr(inner, "__name__", "X").upper(), **kwargs)


def given(ns: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The flags of one dataclass that the user actually gave, as {field: value}."""
    out = {}
    for key, value in vars(ns).items():
        if key.startswith(prefix + "."):
            out[key.split(".", 1)[1]] = tuple(value) if isinstance(value, list) else value
    return out


def _override(obj: Any, values: dict[str, Any], section: str) -> Any:
    merged = {**dataclasses.asdict(obj), **values}
    return build_dataclass(type(obj), merged, section)


# -------------------------------------------------------------------------------------------- commands
def _train_parser(model: str) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=f"{PROG} train [{'|'.join(MODELS)}]",
        description=f"Train a {model.upper()} by maximising its ELBO. Writes a run folder: config.toml, checkpoints, "
        "metrics.jsonl, samples, loss.png. Other models: " + ", ".join(f"`elbox train {m} --help`" for m in MODELS),
    )
    p.add_argument("--out", type=Path, help="the run folder to write (default: runs/<model>-<data>)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder from its latest checkpoint")
    p.add_argument("--config", type=Path, metavar="FILE", help="read settings from a TOML file; flags override it")
    add_dataclass_flags(p, MODELS[model][0], "model", f"{model} model")
    add_dataclass_flags(p, DataConfig, "data", "data")
    add_dataclass_flags(p, TrainConfig, "train", "training")
    own = {s for a in p._actions for s in a.option_strings}
    p.other_models = {}
    for other in MODELS:  # every model that has a flag is named (a DDPM flag is also an LDM flag)
        for f in dataclasses.fields(MODELS[other][0]):
            flag = "--" + f.name.replace("_", "-")
            if other != model and flag not in own:
                p.other_models.setdefault(flag, []).append(other)
    return p


def train_config_from_args(argv: list[str]) -> tuple[RunConfig, Path, bool]:
    """`elbox train`'s arguments -> (the run's config, its folder, whether it resumes); nothing is written."""
    argv = list(argv)
    named = bool(argv) and argv[0] in MODELS  # `elbox train vae ...`; the default model is the DDPM
    model = argv.pop(0) if named else "ddpm"
    ns = _train_parser(model).parse_args(argv)
    if ns.resume is not None:
        if ns.resume.name == "checkpoints" and (ns.resume.parent / "config.toml").is_file():
            ns.resume = ns.resume.parent  # RUN/checkpoints: its run, as sample and evaluate take it
        if ns.config is not None:
            raise UserError("--resume reads the run's own config.toml; leave out --config (flags such as --steps still apply)")
        base = load_run_config(ns.resume / "config.toml") if (ns.resume / "config.toml").is_file() else None
        if base is None:
            raise UserError(f"cannot resume {ns.resume}: it holds no config.toml (is it a folder written by `elbox train --out`?)")
        if named and model != base.model:
            raise UserError(f"{ns.resume} is a run of {a_model(base.model)}, not {a_model(model)}")
        out = ns.resume
    else:
        base = load_run_config(ns.config) if ns.config else run_config_from_dict({"model": model})
        if ns.config and named and base.model != model:
            raise UserError(f"{ns.config} configures {a_model(base.model)}, but the command line asks for "
                            f"{a_model(model)}")
        out = ns.out or Path("runs") / f"{base.model}-{base.data.data.replace(':', '-').replace('/', '-')}"
    if base.model != model and (given(ns, "model")):
        raise UserError(f"flags for {a_model(model)} given, but the run is {a_model(base.model)}; use "
                        f"`elbox train {base.model} ...`")
    model_config = _override(base.model_config, _vae_flags(given(ns, "model"), ns.resume), base.model)
    data = base.data
    if base.model == "ldm" and ns.resume is None and not ns.config and "data" not in given(ns, "data"):
        data = _vae_data(model_config.vae)  # latent diffusion trains on its VAE's data unless told otherwise
    cfg = RunConfig(
        model=base.model,
        model_config=model_config,
        data=_override(data, given(ns, "data"), "data"),
        train=_override(base.train, given(ns, "train"), "train"),
    )
    return cfg, out, ns.resume is not None


def _vae_flags(flags: dict[str, Any], resume: Path | None) -> dict[str, Any]:
    """Latent diffusion's --vae, as an absolute path (as config.toml stores it: a resume takes the same VAE however
    its path is written). A new run on it (--config with another --vae, say) reads its description and measures its
    latent scale afresh (unless --latent-scale is given), not the file's."""
    if "vae" not in flags:
        return flags
    flags = {**flags, "vae": str(Path(flags["vae"]).resolve())}
    return flags if resume is not None else {"vae_config": "", "latent_scale": 0.0, **flags}


def cmd_train(argv: list[str]) -> int:
    from elbox.training.loop import train

    cfg, out, resume = train_config_from_args(argv)
    result = train(cfg, out, resume=resume)
    # stopped by a signal: exit as a shell reports it (130 SIGINT, 143 SIGTERM), so `train && next` does not go on
    code = 128 + signal.Signals[result.stopped_by].value if result.stopped_by else 0
    if not result.is_main:  # another rank under torchrun: rank 0 reports
        return code
    parts = [f"trained {cfg.model} to step {result.step} in {result.seconds:.0f} s ({result.images_per_second:.0f} img/s)"]
    if result.stopped_by:
        parts.append(f"stopped by {result.stopped_by} after saving; continue with `elbox train --resume {out}`")
    if result.skipped:
        parts.append(f"{result.skipped} step(s) skipped for NaN/Inf")
    if result.skipped_files:
        names = ", ".join(result.skipped_files[:3]) + (", ..." if len(result.skipped_files) > 3 else "")
        parts.append(f"{len(result.skipped_files)} unreadable data file(s) skipped ({names}; all listed in "
                     f"{out / 'skipped-files.txt'})")
    if result.heldout_bpd is not None:
        parts.append(f"held-out bound: {result.heldout.bpd:.4f} {result.heldout.bpd_label} (full bound, "
                     f"{result.heldout.examples} test examples)")
    parts.append("wrote " + ", ".join(map(str, result.written())))
    print("elbox: " + "; ".join(parts), flush=True)
    return code


def _vae_data(vae_run: str) -> DataConfig:
    """The data settings the VAE run at ``vae_run`` was trained with."""
    from elbox import checkpoint as ckpt

    if not vae_run:
        raise UserError("latent diffusion needs a trained VAE: `elbox train ldm --vae RUN_OF_A_VAE`")
    desc = ckpt.load_checkpoint(vae_run, with_training_state=False).description
    return build_dataclass(DataConfig, desc.get("data", {}), "data")


def cmd_sample(argv: list[str]) -> int:
    from elbox import devices
    from elbox.api import load, write_sample_png

    p = OneLineParser(prog=f"{PROG} sample", description="Draw samples from a trained run and write them as a PNG grid "
                      "(or an .npz).")
    p.add_argument("run", type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", help="the PNG grid to write (FILE.png), the samples themselves as FILE.npz (uint8 "
                   "N x H x W x C in arr_0), or a folder to write a grid in (default: "
                   "RUN/samples-<mode>[-ddim<STEPS>[-eta<ETA>]][-noema][-step-<N>]-seed<SEED>.png); "
                   "never overwrites")
    add_dataclass_flags(p, SampleConfig, "sample", "sampling")
    ns = p.parse_args(argv)
    cfg = build_dataclass(SampleConfig, given(ns, "sample"), "sample")
    model = load(ns.run, ema=cfg.ema, device=cfg.device)
    if note := devices.emulated_bf16_note(cfg.precision, next(model.parameters()).device):
        print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)
    path = write_sample_png(model, ns.run, cfg, ns.out, progress=True)
    print(f"elbox: wrote {path}", flush=True)
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from elbox.api import evaluate, load

    p = OneLineParser(prog=f"{PROG} evaluate", description="Measure a trained run on held-out data: the negative "
                      "ELBO in bits/dim (every DDPM timestep computed), the importance-weighted estimate of -log p(x) "
                      "(--metric nll), or FID and KID of samples (--metric fid).")
    p.add_argument("run", type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line only")
    add_dataclass_flags(p, EvaluateConfig, "evaluate", "evaluation")
    ns = p.parse_args(argv)
    cfg = build_dataclass(EvaluateConfig, given(ns, "evaluate"), "evaluate")
    model = load(ns.run, ema=cfg.ema, device=cfg.device)
    result = evaluate(model, ns.run, cfg, progress=not ns.json)
    if cfg.metric in ("fid", "kid"):
        if ns.json:
            print(json.dumps(result.to_dict()))
            return 0
        print(f"sample quality of {result.num} samples against {result.reference} ({result.reference_n} images), "
              f"standard FID Inception-v3 (sha256 {result.weights_sha256[:12]}...):")
        print(f"  FID {result.fid:.3f}   KID {result.kid:.5f} ± {result.kid_std:.5f}   ({result.seconds:.0f} s)")
        return 0
    if ns.json:
        print(json.dumps(result.to_dict() | {"per_step": None, "per_step_labels": None}))
        return 0
    name = "-log p(x) (IWAE, K=%d)" % result.k if result.metric == "nll" else "negative ELBO"
    print(f"{name} on {result.examples} held-out examples of {result.dims} dims:")
    print(f"  {result.nats:.3f} ± {result.nats_stderr:.3f} nats/example   {result.bpd:.4f} ± {result.bpd_stderr:.4f} "
          f"{result.bpd_label}")
    width = max((len(term) for term in result.terms), default=0)
    for term, value in result.terms.items():
        print(f"  {term:>{width}}: {value:.3f} nats/example")
    if cfg.per_step:
        print(f"  per-timestep terms written to {cfg.per_step}")
    return 0


def cmd_report(argv: list[str]) -> int:
    from elbox.report import write_report

    p = OneLineParser(prog=f"{PROG} report", description="Write one self-contained HTML page about one or several "
                      "runs: measurements, training curves, per-timestep terms, samples; several runs side by side.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="the page to write (never overwritten)")
    ns = p.parse_args(argv)
    print(f"elbox: wrote {write_report(ns.runs, ns.out)}", flush=True)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = OneLineParser(prog=PROG, description="elbox: VAEs and DDPMs, both trained by maximising an evidence lower "
                        "bound. Commands: train, sample, evaluate, report; `elbox COMMAND --help` for each.")
    top.add_argument("command", choices=list(COMMANDS), help="train | sample | evaluate | report")
    top.add_argument("--version", action="version", version=f"elbox {__import__('elbox').__version__}")
    try:
        if not argv or argv[0] in ("-h", "--help", "--version"):
            top.parse_args(argv or ["--help"])
            return 0
        if argv[0] not in COMMANDS:
            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            raise UserError(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(COMMANDS)}"))
        return COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from elbox.compiling import backend_failure

        if (reason := backend_failure(e)) is None:
            raise
        print(f"{PROG}: error: {reason}; use --compile-backend inductor (or aot_eager)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
