"""Entry point: `python -m experiments fit|validate|test|predict --config ...` (one LightningCLI)."""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from experiments import cli_errors
from experiments.batch_size import EffectiveBatchSize
from experiments.cli_errors import USER_ERRORS, ConciseParser, exit_with
from experiments.config_defaults import expand_config_defaults
from experiments.console import add_step_progress_bar, announce_run_folder, silence_known_noise
from experiments.protocol_check import require_matching_protocol
from experiments.run_dir import check_fresh_run_folder, pin_run_folder, resolve_ckpt_path
from experiments.standin import resolve_pretrained
from experiments.wiring import match_decoding


class ExperimentCLI(LightningCLI):
    """LightningCLI with the effective-batch-size group, config `defaults:` lists and stable run folders."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EffectiveBatchSize, "batch")
        parser.add_argument("--defaults", type=list[str] | None, default=None, help="group configs (expanded)")
        parser.add_argument(
            "--allow_protocol_mismatch", type=bool, default=False,
            help="test: evaluate even if the evaluation spec disagrees with the shards' eval_* metadata",
        )  # fmt: skip

    def before_instantiate_classes(self) -> None:
        # Already expanded into --config arguments; the saved config must not re-apply relative paths.
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.defaults = None
        pin_run_folder(config.trainer)  # requeued SLURM jobs log, save and resume in one folder
        add_step_progress_bar(config.trainer)
        init_args = config.model.get("init_args") if config.get("model") is not None else None
        if init_args is not None and isinstance(init_args.get("pretrained"), str):
            # `standin:sd2` -> the framework's own SD2-layout stand-in, built into the cache on first use
            init_args.pretrained = resolve_pretrained(init_args.pretrained)

    def _prepare_data(self, split: str) -> None:
        """Missing shards stop here, before the logger creates a run folder (one message with the convert command);
        then the datamodule learns what the model reads (`decode_normals`)."""
        check = getattr(self.datamodule, "check_shards", None)
        if check is not None:
            check(split)
        match_decoding(self.model, self.datamodule)

    def before_validate(self) -> None:
        self._prepare_data("val")

    def before_test(self) -> None:
        self._prepare_data("test")
        allow = bool(self.config["test"].get("allow_protocol_mismatch"))
        require_matching_protocol(self.model, self.datamodule, allow)

    def before_predict(self) -> None:
        self._prepare_data("predict")

    def before_fit(self) -> None:
        config = self.config_init["fit"]
        self._prepare_data("fit")
        check_fresh_run_folder(self.trainer, config.get("ckpt_path"))  # before `auto` is resolved to a file
        config.ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), self.config["fit"].trainer.default_root_dir)
        announce_run_folder(self.trainer, config.ckpt_path)


silence_known_noise()


def main(args: list[str] | None = None, run: bool = True) -> ExperimentCLI:
    """Run the CLI in-process; `args` as on the command line (tests pass them, the shell leaves them None).

    User errors (a bad config value or key, a broken YAML file, a missing file) end in one message, not a traceback.
    """
    try:
        if args is None:  # from the shell: expand in place, since LightningCLI warns when given both
            sys.argv[1:] = expand_config_defaults(sys.argv[1:])
            expanded = sys.argv[1:]
        else:
            args = expanded = expand_config_defaults(list(args))
    except USER_ERRORS as error:
        exit_with(error)
    cli_errors.config_files[:] = [expanded[i + 1] for i, a in enumerate(expanded[:-1]) if a == "--config"]
    try:
        return ExperimentCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=ConciseParser,
            args=args,
            run=run,
        )
    except USER_ERRORS as error:
        exit_with(error)


if __name__ == "__main__":
    main()
