"""Would per-layer block tables beat whole-block sharing? A fidelity simulation on forced traces (issue 20, idea 4).

    python -m bench.layer_share [--model smollm2-135m] [--thresholds 0.8,0.7,0.62,0.55] [--num-kv-blocks 1280]
                                [--out docs/results/layer-share-smollm2-135m]

A per-layer block table would let layer l of a finished block point at layer l of an earlier block when that
layer's MemShare stage-2 similarity, (s(K) + s(V)) / 2, reaches the threshold. The `layer_copy` policy below serves
attention exactly what such a table would: it copies that layer's K and V of the earlier block over the finished
block's, which is the same content pointing would show. So KL against dense is exact. Nothing is freed (the engine
allocates whole blocks), so memory and throughput are dense's; the run's affected ratio is the fraction of generated
(block, layer) pairs replaced, which is the fraction of generated KV per-layer tables would free. Stage 1 is left
out: every earlier block is a candidate, so this is the most per-layer sharing could find at each threshold.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from memshare.config import ShareConfig, register_policy
from memshare.engine.block_manager import BlockManager
from memshare.engine.policy import ModelAccess, SharingPolicy
from memshare.engine.sequence import Sequence
from memshare.eval.replay import ReplayConfig, run_replay
from memshare.eval.report import build_report
from memshare.sharing.stage2 import read_blocks, relative_similarity

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "data" / "qwq-traces" / "traces.jsonl"


@dataclass(slots=True)
class LayerCopyConfig(ShareConfig):
    policy: ClassVar[str] = "layer_copy"
    layer_threshold: float = field(default=0.7, metadata={"help": "per-layer stage-2 similarity to replace a layer"})


@dataclass(slots=True)
class LayerState:
    preemptions: int
    next_block: int
    replaced: int = 0  # (block, layer) pairs replaced


class LayerCopyPolicy(SharingPolicy):
    """Replaces each layer of every finished generated block whose best earlier match reaches the threshold."""

    def __init__(self, config: LayerCopyConfig, block_manager: BlockManager, model: ModelAccess) -> None:
        super().__init__(config, block_manager, model)
        self.unrotate_keys = model.unrotate_keys
        self.states: dict[int, LayerState] = {}
        self.pairs_replaced = 0

    def after_step(self, running: list[Sequence]) -> None:
        bs = self.block_manager.block_size
        for seq in running:
            state = self.states.get(seq.seq_id)
            if state is None or state.preemptions != seq.num_preemptions:  # recomputed blocks are dense again
                state = self.states[seq.seq_id] = LayerState(seq.num_preemptions, self.first_generated_block(seq))
            while state.next_block < seq.num_computed_tokens // bs:
                state.replaced += self._replace_layers(seq, state.next_block)
                state.next_block += 1

    def finish(self, seq: Sequence) -> None:
        super().finish(seq)
        state = self.states.pop(seq.seq_id, None)
        if state is not None:  # whole-block equivalents, so the affected ratio is the fraction of pairs
            layers = self.block_manager.kv_cache.num_layers
            seq.num_affected_blocks += state.replaced / layers
            self.affected_blocks += state.replaced / layers

    def stats(self) -> dict[str, float | int]:
        return super().stats() | {"layer_pairs_replaced": self.pairs_replaced}

    def _replace_layers(self, seq: Sequence, index: int) -> int:
        bs = self.block_manager.block_size
        table = seq.block_table[: index + 1]
        keys, values = read_blocks(self.block_manager, self.unrotate_keys, table, [i * bs for i in range(index + 1)])
        key_sim = relative_similarity(keys[:, index:].flatten(2), keys[:, :index].flatten(2))
        value_sim = relative_similarity(values[:, index:].flatten(2), values[:, :index].flatten(2))
        best, source = ((key_sim + value_sim) / 2)[:, 0].max(dim=1)  # per layer
        replaced = 0
        for layer, (score, j) in enumerate(zip(best.tolist(), source.tolist())):
            if score >= self.config.layer_threshold:
                self.block_manager.kv_cache.copy_block(layer, table[j], table[index])
                replaced += 1
        self.pairs_replaced += replaced
        return replaced


register_policy(LayerCopyConfig, LayerCopyPolicy, knobs=("layer_threshold",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--thresholds", default="0.8,0.7,0.62,0.55")
    parser.add_argument("--num-kv-blocks", type=int, default=1280, help="enough that nothing is preempted")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = args.out or ROOT / "docs" / "results" / f"layer-share-{args.model}"
    summaries = run_replay(ReplayConfig(model=args.model, traces=args.traces, out=out, max_tokens=args.max_tokens,
                                        policies="none,layer_copy",
                                        sweep={"layer_threshold": args.thresholds.split(",")},
                                        engine={"num_kv_blocks": args.num_kv_blocks}))
    build_report(out)  # report.md and plots beside the runs
    print("| layer_threshold | (block, layer) pairs replaced | KL(dense ‖ policy) | top-1 |\n|---|---|---|---|")
    for summary in summaries[1:]:
        print(f"| {summary['run']} | {summary['affected_ratio']:.1%} | {summary['kl']:.4f} | {summary['top1']:.1%} |")


if __name__ == "__main__":
    main()
