"""One training run, from the first check to the output folder: the pre-flight both entry
points share (launcher, output folder, resume, tokenizer, model, fingerprint), then set-up or
resume, trackers, checkpoints, the Hub, the loop, and the final model, samples and card.

    python train_clm.py --config configs/demo_cpu.yaml

Shared by train_clm.py (packed blocks) and finetune/run_sft.py (padded examples), which call the
same steps in the same order:

    topology = session.launch(train_cfg)                       # precision and ranks
    resume = session.check_output(train_cfg, topology, ...)    # output folder, resume, world
    tokenizer = session.load_tokenizer(data_cfg, model_cfg)
    backend = runtime.start(train_cfg, topology)
    model, fingerprint = session.build_model(backend, configs, tokenizer, block_size, resume)
    session.run_training(backend, configs, model, tokenizer, batches, heldout, ...)

They differ only in how they build the batches (and SFT's LoRA adapters), never in how a run
goes.
"""

from __future__ import annotations

from pathlib import Path

from . import attention, checkpoint as ckpt, data, faults, hub, loop, model as models, optim
from . import outputs, runtime
from .config import TrainingConfig
from .errors import TrainingError, UsageError
from .metrics import MetricsLogger, peak_flops, read_metrics, wandb_run_id
from .parallel import Backend, Topology
from .parallel.launch import close_distributed, resolve_mixed_precision
from .record import RunRecord
from .watchdog import FLOOR_S, Watchdog


def launch(train_cfg: TrainingConfig) -> Topology:
    """The first step of every run: the precision it uses (resolved in place against the
    launcher's, so that everything after sees it) and this process's Topology, read once."""
    train_cfg.mixed_precision = resolve_mixed_precision(train_cfg.mixed_precision)
    return Topology.from_launcher()


def check_output(train_cfg: TrainingConfig, topology: Topology,
                 reshardable: bool = True, log=print) -> Path | None:
    """Refuse a bad --output_dir / --resume_from_checkpoint before any work; returns the
    checkpoint to resume from (None for a new run), its global batch fitted to this run's
    processes (`fit_to_world`). A checkpoint of another output folder continues into
    --output_dir, which is then guarded like a new run's. A restart by torchrun's agent
    (`--max-restarts`) of the launch that last wrote --output_dir goes on from that folder's
    newest complete checkpoint, whatever --resume_from_checkpoint says (`auto`)."""
    out = Path(train_cfg.output_dir)
    spec = train_cfg.resume_from_checkpoint
    say = log if topology.is_main else (lambda *_: None)
    # (torchrun's restart count cannot tell: a node whose own ranks did not fail restarts them
    # without counting, when another node's agent starts a new rendezvous round)
    if topology.job and outputs.launched_by(out) == topology.job:
        newest = ckpt.newest_complete(out, log=say)
        say(f"a restart of this launch (torchrun --max-restarts, run id {topology.job}): "
            + (f"resuming from {newest}" if newest else
               "no checkpoint was written before the failure; starting again"))
        if newest:
            fit_to_world(newest, train_cfg, topology, reshardable)
            return newest
        if spec in (None, "auto"):  # our own attempt's files: start it again over them
            return None
    if spec == "auto":
        newest = ckpt.newest_complete(out, log=say)
        spec = str(newest) if newest else None
    if spec:
        path = ckpt.resolve_resume(out, spec)
        if ckpt.home_of(path) != out.resolve():
            outputs.check_output_dir(train_cfg.output_dir, train_cfg.overwrite_output_dir)
        fit_to_world(path, train_cfg, topology, reshardable)
        return path
    outputs.check_output_dir(train_cfg.output_dir, train_cfg.overwrite_output_dir)
    return None


def load_tokenizer(data_cfg, model_cfg):
    """--tokenizer_name, else the tokenizer beside --model_name_or_path."""
    name = data_cfg.tokenizer_name or model_cfg.model_name_or_path
    if not name:
        raise UsageError("no tokenizer (pass --tokenizer_name, e.g. gpt2 or a local folder)")
    return data.load_tokenizer(name)


def build_model(backend: Backend, configs: dict, tokenizer, block_size: int,
                resume: Path | None, num_workers: int = 0, adapt=None):
    """(model, fingerprint): the model `configs["model"]` describes (seeded, checked against
    the tokenizer and block size, with activation checkpointing if asked, then `adapt(model)`:
    SFT's LoRA adapters), and what a resume must match, checked against `resume` now."""
    from accelerate.utils import set_seed

    train_cfg = configs["training"]
    set_seed(train_cfg.seed)
    model = models.build_model(configs["model"], tokenizer, block_size)
    if train_cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    if adapt is not None:
        model = adapt(model)
    world = backend.topology.dp_world_size
    fingerprint = ckpt.fingerprint(model, tokenizer, block_size, train_cfg.global_batch(world),
                                   world, num_workers, configs)
    check_resume(resume, fingerprint)
    return model, fingerprint


def fit_to_world(resume: Path | None, train_cfg: TrainingConfig, topology: Topology,
                 reshardable: bool = True, log=print) -> None:
    """Resuming on another number of processes keeps the checkpoint's global batch: the
    accumulation steps are recomputed (and printed) for this run's processes and micro-batch;
    a global batch they cannot make exactly is a one-line error. Call before the accelerator
    is made (DeepSpeed's config takes the accumulation steps)."""
    if not resume:
        return
    saved = ckpt.read_trainer_state(resume)["fingerprint"]
    before, world = saved["world_size"], topology.dp_world_size
    if before == world:
        return
    if not reshardable:
        raise ckpt.CheckpointError(f"cannot resume {resume} on {world} processes: it was saved "
                                   f"on {before} and this run's data cannot be dealt again "
                                   f"(resume with {before} processes)")
    sequences, micro = saved["global_batch"], train_cfg.per_device_train_batch_size
    if sequences % (micro * world):
        fits = [m for m in range(1, sequences + 1) if sequences % (m * world) == 0]
        fix = (f"pass --per_device_train_batch_size {' or '.join(map(str, fits[-3:]))}"
               if fits else f"use a number of processes that divides {sequences}")
        raise ckpt.CheckpointError(
            f"cannot resume {resume} on {world} processes: its global batch of {sequences} "
            f"sequences is not a multiple of --per_device_train_batch_size {micro} x {world} "
            f"processes ({fix})")
    accum = sequences // (micro * world)
    given = train_cfg.gradient_accumulation_steps
    change = f"{given} -> {accum}" if accum != given else f"stays {accum}"
    if topology.is_main:
        log(f"resuming a {before}-process checkpoint on {world} process"
            f"{'es' if world > 1 else ''}: --gradient_accumulation_steps {change} keeps its "
            f"global batch of {sequences} sequences, {sequences * saved['block_size']:,} tokens "
            f"({micro} per process x {accum} x {world})")
    train_cfg.gradient_accumulation_steps = accum


def check_resume(resume: Path | None, fingerprint: dict) -> None:
    if resume:
        ckpt.check_fingerprint(ckpt.read_trainer_state(resume)["fingerprint"], fingerprint,
                               resume)


def run_training(backend: Backend, configs: dict, model, tokenizer, batches, heldout,
                 fingerprint: dict, resume: Path | None, finalize=None,
                 extra_evals=(), **record) -> dict:
    """Train `model` on `batches` (an endless loader with state_dict/load_state_dict) and write
    the output folder; `heldout` is what loop.evaluate takes; `configs` the run's config
    dataclasses by section (recorded with what `record` adds, e.g. SFT's example counts);
    `finalize(model, tokenizer, output_dir)`, on the main process, turns the trained model into the one
    the final folder holds (finetuning merges LoRA adapters there); `extra_evals`, functions
    `(model, backend) -> {"eval_<metric>": ..}`, run beside the held-out loss."""
    train_cfg, seq_len = configs["training"], configs["data"].block_size
    run = outputs.resolved_config(configs, model, backend.topology.dp_world_size, train_cfg,
                                  seq_len, **record)
    session = Session(backend, train_cfg, tokenizer, batches, heldout, run, fingerprint,
                      finalize, extra_evals)
    session.prepare(model, seq_len)
    session.start_or_resume(resume)
    session.start_trackers()
    if session.evaluates and not resume:  # the untrained baseline, as nanoGPT users expect
        session.logger.log_eval(0, 0, session.evaluate())
    try:
        stop = session.train()
        return session.stopped(stop) if stop else session.finish()
    except TrainingError:
        # every rank raises it at the same step, so they can leave the group together (a group
        # left to interpreter shutdown can abort the process after the error line)
        try:
            close_distributed()
        except Exception:  # the error line matters more than a clean goodbye
            pass
        raise
    finally:  # on every way out, errors included: what was queued is pushed or reported
        if session.pusher:
            session.pusher.finish_and_report(timeout=120)


class Session:
    """The pieces of one run and its steps, in the order run_training calls them."""

    def __init__(self, backend: Backend, train_cfg: TrainingConfig, tokenizer, batches, heldout,
                 run: RunRecord, fingerprint: dict, finalize=None, extra_evals=()):
        self.backend, self.accelerator = backend, backend.accelerator
        self.cfg, self.tokenizer = train_cfg, tokenizer
        self.batches, self.heldout, self.run, self.fingerprint = batches, heldout, run, fingerprint
        self.finalize, self.extra_evals = finalize, list(extra_evals)
        self.out = Path(train_cfg.output_dir)
        self.main = backend.topology.is_main
        self.state, self.tracker_id, self.pusher = loop.LoopState(), None, None
        run.name = train_cfg.run_name or self.out.resolve().name

    @property
    def evaluates(self) -> bool:
        return self.heldout is not None or bool(self.extra_evals)

    def prepare(self, model, seq_len: int) -> None:
        """Optimizer, attention kernels, compile, then the backend's wrapping or sharding."""
        cfg = self.cfg
        self.fpt = models.flops_per_token(model, seq_len)
        make_optimizer = lambda m: optim.make_optimizer(  # noqa: E731
            m, cfg, fused=self.backend.fused_optimizer())
        attention.choose_attention(self.accelerator.device, cfg.mixed_precision,
                                 model.config._attn_implementation,
                                 model.config.hidden_size // model.config.num_attention_heads)
        faults.configure(self.out, self.backend.topology.rank)  # CLM_FAULTS only
        faults.install(model)
        if cfg.torch_compile:  # after activation checkpointing, before wrapping or sharding
            models.compile_blocks(model)
        loop.compile_loss(cfg.torch_compile)
        self.model, self.optimizer = self.backend.prepare(model, make_optimizer(model),
                                                          make_optimizer)
        self.run.distributed = runtime.describe(self.backend)

    def start_or_resume(self, resume: Path | None) -> None:
        """Load the checkpoint (and carry its metrics over), or start the output folder."""
        if resume:
            saved = ckpt.load_checkpoint(self.backend, self.model, self.optimizer, resume,
                                         self.batches)
            self.state = loop.LoopState(**saved["loop"])
            self.tracker_id = saved.get("tracker_id")
            if self.main:
                outputs.continue_run(self.out, ckpt.home_of(resume), self.state.step)
                ckpt.clean_leftovers(self.out)
                ckpt.set_aside_newer(self.out, self.state.step)  # a roll-back: a new future
                print(f"resumed from {resume} at step {self.state.step} "
                      f"({self.state.tokens:,} tokens)")
        elif self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            outputs.clear_run_files(self.cfg.output_dir)
        if self.main:
            outputs.mark_launch(self.out, self.backend.topology)
            outputs.write_record(self.out / "run_config.yaml", self.run)

    def start_trackers(self) -> None:
        """wandb/tensorboard (the same wandb run continues on resume), metrics and progress,
        and the background Hub pusher."""
        wandb_kwargs = {"name": self.run.name, "dir": str(self.out)}
        if self.tracker_id:
            wandb_kwargs.update(id=self.tracker_id, resume="allow")
        self.accelerator.init_trackers(self.run.name, config=self.run.flat_options(),
                                       init_kwargs={"wandb": wandb_kwargs})
        self.tracker_id = self.tracker_id or wandb_run_id(self.accelerator)
        self.logger = MetricsLogger(self.out, self.accelerator, self.cfg.max_steps,
                                    start_step=self.state.step, flops_per_token=self.fpt,
                                    peak_flops=peak_flops(self.accelerator.device),
                                    devices=self.backend.topology.world_size)
        if self.cfg.push_to_hub and self.main:
            self.pusher = hub.HubPusher(self.cfg.hub_model_id, self.cfg.hub_private_repo)

    def evaluate(self) -> dict:
        # eagerly: evaluation, benchmarks and generation have shapes and grad modes of their
        # own, each a recompilation of the training graphs (--torch_compile)
        with models.eager():
            loss = loop.evaluate(self.model, self.heldout, self.cfg.per_device_eval_batch_size,
                                 self.backend)
            results = {"eval_loss": loss} if loss is not None else {}
            for fn in self.extra_evals:
                results.update(fn(self.model, self.backend))
        return results

    def save(self, state) -> None:
        path = ckpt.save_checkpoint(
            self.backend, self.model, self.optimizer, self.tokenizer, self.batches, state,
            {"fingerprint": self.fingerprint, "tracker_id": self.tracker_id,
             "run_config": self.run.to_dict()},
            self.out, self.cfg.save_total_limit, keep=self.pusher.busy() if self.pusher else ())
        if self.pusher and self.cfg.hub_strategy == "every_save":
            self.pusher.push(path, f"step-{state.step}", f"checkpoint at step {state.step}")

    def train(self) -> str | None:
        """The loop until max_steps or a signal; returns the signal's name if stopped by one."""
        topology = self.backend.topology
        watch = Watchdog(self.cfg.step_timeout, self.out, topology.rank, topology.world_size,
                         floor=min(FLOOR_S, self.cfg.ddp_timeout))
        with runtime.StopRequest() as stop:
            try:
                loop.train(self.cfg, self.backend, self.model, self.optimizer, self.batches,
                           self.state,
                           loop.Hooks(self.logger, self.evaluate, self.save, stop, watch))
            finally:  # end the progress bar's line, so an error prints on a line of its own
                self.logger.close()
        st = self.state
        self.run.step, self.run.tokens, self.run.elapsed_s = st.step, st.tokens, st.elapsed_s
        self.run.skipped_steps = st.skipped
        return stop.signal_name

    def stopped(self, signal_name: str) -> dict:
        if self.main:
            print(f"stopped by {signal_name} at step {self.state.step}: checkpoint saved in "
                  f"{ckpt.checkpoint_root(self.out)}/step-{self.state.step}. To continue, run "
                  "the same command with --resume_from_checkpoint latest")
        self._close()
        self.run.stopped = signal_name
        return self.run.to_dict()

    def finish(self) -> dict:
        """The final model folder, samples and card; the Hub push of the final model."""
        self.accelerator.wait_for_everyone()
        self._record_evals()
        final_model = self.backend.full_model(self.model)  # collective if sharded
        if self.main:
            if self.finalize is not None:
                final_model = self.finalize(final_model, self.tokenizer, self.out)
            with models.eager():
                samples = outputs.finish_run(self.cfg.output_dir, final_model, self.tokenizer,
                                             self.run, self.cfg)
            self._report(samples)
            if self.pusher:
                self.pusher.push(self.out, "main", f"final model at step {self.state.step}",
                                 final=True)
                self.pusher.finish_and_report()  # no time limit: the final model must go up
        self._close()
        return self.run.to_dict()

    def _record_evals(self) -> None:
        evals = [r for r in read_metrics(self.out)
                 if any(k.startswith("eval_") for k in r)] if self.main else []
        first, last = [{k: v for k, v in r.items() if k.startswith("eval_")} for r in
                       ((evals[0], evals[-1]) if evals else ({}, {}))]
        run = self.run
        run.final_eval_loss, run.first_eval_loss = last.get("eval_loss"), first.get("eval_loss")
        run.final_eval, run.first_eval = last, first

    def _report(self, samples: list[str]) -> None:
        for text in samples:
            print(f"--- sample\n{text}")
        for key, value in self.run.final_eval.items():
            if key not in ("eval_loss", "eval_ppl"):
                before = self.run.first_eval.get(key)
                print(f"held-out {key[5:]}: {before:.4f} at the first evaluation, "
                      f"{value:.4f} at step {self.state.step}")
        print(f"\nfinal eval loss {self.run.final_eval_loss}, model saved to {self.out}\n"
              f"load it: python -c \"from transformers import pipeline; "
              f"print(pipeline('text-generation', '{self.out}')('The')[0]['generated_text'])\"")

    def _close(self) -> None:
        # Barrier first: Accelerate's end_training destroys the process group without one, so a
        # rank that got there while rank 0 was still writing the final folder tore its gloo
        # group down under a live peer and aborted ("terminate called without an active
        # exception", exit -6, seen 2 times in ~10 two-process suites) after all was written.
        close_distributed()
        self.accelerator.end_training()
