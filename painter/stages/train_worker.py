"""The train job's worker side: what every Ray Train worker runs (`train_loop`), DDP over token shards.

`GPTRun` is the GPT's hooks of the one runner (`painter.stages.train_session.TrainerRun`, which owns the
loop, the reporting and checkpoint cadence, the divergence stop and the fault switch): build or restore
the GPT and AdamW (from a model directory plus `train_state.pt`), iterate this worker's split of the
shards with a seeded per-epoch local shuffle (or a full shuffle of the split kept in memory, which the
worker reads itself: `painter.io.shards.read_split`), copy the
micro-batches ahead to the device (`painter.training.gpt.prefetch_to_device`), call
`painter.training.gpt.train_step` (on the model compiled with `torch.compile` where `use_compile` says so),
the metrics (tokens/s, and on a known GPU the model FLOPs utilisation), the validation loss and, with
`record_rows`, the idx of every row trained on. The driver side, options and summary are in
`painter.stages.train`.
"""
from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from painter.checkpoint.model_dir import load_model, save_model
from painter.io.shards import read_split
from painter.models.gpt import GPT
from painter.runtime import synchronize, autocast
from painter.stages.train_session import STATE_FILE, SessionConfig, TrainerRun, copy_source_files, shuffled_batches
from painter.training.gpt import GPTLoss, compile_model, drop_captions, make_optimizer, mfu, peak_bf16_tflops, prefetch_to_device, train_flops_per_token, train_step, use_compile


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(SessionConfig):
    """What every worker of the train job needs, built once by the driver (`painter.stages.train.worker_config`);
    `train` is a `painter.training.gpt.TrainConfig`."""
    has_gpt: bool  # `source` has GPT weights to start from (else a seeded random init of `model`)
    null_caption_prob: float  # caption dropout (--null-caption-prob)
    record_rows: bool  # write the idx of every row trained on to <run>/rows/
    has_val: bool  # a "val" dataset to measure after every epoch
    train_files: tuple[str, ...] = ()  # the token shards each worker reads its share of, when `in_memory`


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function: restore or start, train to `total_steps`, report and checkpoint
    (`loop_config`: {"config": WorkerConfig})."""
    GPTRun(loop_config["config"]).run()


def _shard_collate():
    """A Ray collate fn: an Arrow batch of token shards -> (text_ids (B, Tt), image_tokens (B, Ti), idx list)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class ShardCollate(ArrowBatchCollateFn):
        def __call__(self, table: pa.Table):
            def column(name):  # list<int> column -> (B, L) tensor
                values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                return torch.from_numpy(np.array(values).reshape(table.num_rows, -1))
            return column("text_ids"), column("image_tokens"), table.column("idx").to_pylist()

    return ShardCollate()


def split_in_memory(files: list[str], rank: int, world: int, storage) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """This worker's whole split of a (small) training set, read once from the shards without Ray Data
    (`painter.io.shards.read_split`: the same rows for a rank in every run, in idx order, so the seeded
    per-epoch order makes runs repeatable): text_ids (N, Tt) and image_tokens (N, Ti) as int32, and idx."""
    text_ids, image_tokens, idx = read_split(files, rank, world, storage)
    return torch.from_numpy(text_ids), torch.from_numpy(image_tokens), idx


def memory_batches(data: tuple, batch_size: int, seed: int):
    """(text_ids, image_tokens, idx) micro-batches of an in-memory split in a seeded full shuffle, full batches only."""
    text_ids, image_tokens, idx = data
    for rows in shuffled_batches(len(idx), batch_size, seed):
        yield text_ids[rows].long(), image_tokens[rows].long(), [idx[i] for i in rows.tolist()]


class GPTRun(TrainerRun):
    """One worker's session of the train job: the GPT and AdamW, restored from the last checkpoint if any."""
    label = "train"
    cfg: WorkerConfig

    def setup(self, checkpoint) -> dict:
        import ray.train.torch

        self.gpt, state = self._restore(checkpoint)
        model = ray.train.torch.prepare_model(GPTLoss(self.gpt))  # DDP (gloo on CPU) when world > 1
        self.compiled = use_compile(self.device, self.tc.compile)
        self.model = compile_model(model, self.compiled)
        self.flops_per_token, self.peak_tflops = train_flops_per_token(self.gpt), peak_bf16_tflops(self.device)
        self.optimizer = make_optimizer(self.gpt, self.tc)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state.pop("optimizer"))
        seed = self.cfg.seed * 1_000_003 + self.rank * 10_007 + state["step"]
        self.generator = torch.Generator(self.device).manual_seed(seed)  # pkeep corruption
        self.rows_seen: list[str] = []
        self.memory: tuple | None = None  # this worker's split of the training set, when the run keeps it in memory
        return state

    def _restore(self, checkpoint) -> tuple[GPT, dict]:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                gpt = load_model(d, parts=("gpt",)).gpt
                state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            print(f"train: rank {self.rank} resumes at step {state['step']} from {checkpoint.path}", flush=True)
            return gpt.train(), state
        if self.cfg.has_gpt:
            gpt = load_model(self.cfg.source, parts=("gpt",), storage=self.storage).gpt
        else:
            torch.manual_seed(self.cfg.seed)
            gpt = GPT(self.config.gpt)
        return gpt.train(), {"step": 0, "first_loss": None, "val_loss": None, "tokens": 0, "seconds": 0.0,
                             "metrics": {}}

    def batches(self, shard, epoch: int, steps_done: int):
        """Micro-batches (text_ids, image_tokens, idx) of `epoch`, captions dropped on the host, copied
        ahead to the device."""
        host = self.host_batches(shard, epoch, skip=steps_done * self.tc.grad_accum)
        return prefetch_to_device(self.with_dropped_captions(host, self.state["step"]), self.device)

    def with_dropped_captions(self, batches, first_step: int):
        """Caption dropout (`--null-caption-prob`) of host micro-batches, the j-th being micro-batch
        j % grad_accum of step first_step + j // grad_accum; rows numbered across ranks. On the host, with
        the batch, before the prefetch: the draw builds its row keys from Python values, which on the
        device would be a blocking copy every micro-batch."""
        accum = self.tc.grad_accum
        for j, (text_ids, image_tokens, idx) in enumerate(batches):
            first_row = (self.rank * accum + j % accum) * text_ids.size(0)
            yield drop_captions(text_ids, self.cfg.null_caption_prob, self.tokenizer.pad_id,
                                self.cfg.seed, first_step + j // accum, first_row), image_tokens, idx

    def host_batches(self, shard, epoch: int, skip: int):
        """This worker's micro-batches of `epoch` on the host (seeded local shuffle), the first `skip` left out."""
        c, buffer = self.cfg, self.cfg.shuffle_buffer
        seed = (c.seed * 1009 + epoch) * 1009 + self.rank
        if c.in_memory:  # a small run: read the split once, no Ray Data at all
            self.memory = self.memory or split_in_memory(c.train_files, self.rank, self.world, self.storage)
            batches = memory_batches(self.memory, c.micro_batch, seed)
        else:
            batches = shard.iter_torch_batches(
                batch_size=c.micro_batch, drop_last=True, collate_fn=_shard_collate(), prefetch_batches=2,
                local_shuffle_buffer_size=max(buffer, c.micro_batch) if buffer else None,
                local_shuffle_seed=seed if buffer else None)
        for i, batch in enumerate(batches):  # (text_ids, image_tokens, idx list)
            if i >= skip:
                yield batch

    def step(self, batches, epoch: int):
        micro = [self._next(batches, epoch) for _ in range(self.tc.grad_accum)]
        self.last_micro = micro[-1]
        return train_step(self.model, self.optimizer, micro, self.tc, self.state["step"],
                          self.config.gpt.img_vocab_size, self.generator)

    def _next(self, batches, epoch: int):
        """The next micro-batch (text_ids, image_tokens) for a step, its rows recorded now that it is used
        (the prefetcher reads ahead, so a run ending mid-epoch leaves read rows untrained)."""
        text_ids, image_tokens, idx = self.take(batches, epoch)
        if self.cfg.record_rows:
            self.rows_seen += idx
        return text_ids, image_tokens

    def metrics(self, result, epoch: int) -> dict:
        """Metrics of the step just done, averaged over ranks, and throughput since the last report."""
        loss = result.loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        synchronize(self.device)  # logging steps only: the clock then counts the steps' device work, done
        seconds = time.perf_counter() - self.window_start
        tokens = self.window_rows * self.world * self.config.gpt.block_size
        self.state["tokens"] += tokens
        self.state["seconds"] += seconds
        if self.state["step"] == 1:
            self.state["first_loss"] = loss.item()
        rate = tokens / max(seconds, 1e-9)
        utilisation = mfu(self.flops_per_token, rate, self.peak_tflops, self.world)
        gpu = {} if utilisation is None else {"mfu": round(utilisation, 4), "peak_tflops": self.peak_tflops}
        return {"step": self.state["step"], "epoch": epoch, "time": round(time.time(), 3), "loss": loss.item(),
                "lr": result.lr, "grad_norm": result.grad_norm.item(), "tokens_per_second": rate,
                "run_tokens_per_second": self.state["tokens"] / max(self.state["seconds"], 1e-9),
                "first_loss": self.state["first_loss"], "val_loss": self.state["val_loss"],
                "threads": torch.get_num_threads(), "compiled": self.compiled, **gpu}

    def checkpoint_metrics(self) -> dict:
        """The loss of the step's last micro-batch with the updated weights (averaged over ranks): a checkpoint
        is only saved when it is finite, so the last one kept is one training can continue from."""
        text_ids, image_tokens = self.last_micro
        self.gpt.eval()
        with torch.no_grad(), autocast(self.device):
            loss = self.gpt.loss(text_ids, image_tokens).float()
        self.gpt.train()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return {"loss_after_step": loss.item()}

    def validates(self, epoch_end: bool, final: bool) -> bool:
        return self.cfg.has_val and (epoch_end or final)

    def validate(self) -> dict:
        """Mean image-token loss over the validation shards (every rank its split, then all-reduced)."""
        import ray.train

        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # (loss * rows, rows)
        self.gpt.eval()
        with torch.no_grad():
            for text_ids, image_tokens, _ in ray.train.get_dataset_shard("val").iter_torch_batches(
                    batch_size=self.cfg.micro_batch, collate_fn=_shard_collate()):
                with autocast(self.device):
                    loss = self.gpt.loss(text_ids.to(self.device), image_tokens.to(self.device))
                sums += torch.stack([loss.double() * text_ids.size(0), sums.new_tensor(text_ids.size(0))])
        self.gpt.train()
        if self.world > 1:
            dist.all_reduce(sums)
        self.state["val_loss"] = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
        return {"val_loss": self.state["val_loss"]}

    def save(self, directory: str) -> None:
        """A full model directory (the source's VQGAN copied, never loaded) plus train_state.pt."""
        copy_source_files(self.cfg.source, directory, ("config.json", "vqgan.safetensors"), self.storage)
        save_model(directory, self.config, self.tokenizer, gpt=self.gpt)
        state = dict(self.state) | {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.state["step"], "total_steps": self.tc.total_steps,
                          "lr": self.state["metrics"].get("lr")},
            "epoch": self.state["step"] // self.cfg.steps_per_epoch}
        torch.save(state, os.path.join(directory, STATE_FILE))

    def end_epoch(self, epoch: int) -> None:
        if self.cfg.record_rows and self.rows_seen:
            path = posixpath.join(self.cfg.run_path, "rows", f"epoch{epoch}-rank{self.rank}.txt")
            with self.storage.open(path, "a") as f:
                f.write("\n".join(self.rows_seen) + "\n")
            self.rows_seen = []
