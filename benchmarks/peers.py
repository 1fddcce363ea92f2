"""Today's small captioning VLMs for benchmarks/latency.py, each built from a config with random weights
(nothing is downloaded; speed does not depend on weights) and run image file -> text as its own image
processor prepares it, greedy, exactly `TOKENS` new tokens:

  blip-base        BlipForConditionalGeneration(BlipConfig()): ViT-B/16 384 px + BERT-base decoder
  git-base         GitForCausalLM(GitConfig()): CLIP ViT-B/16 224 px + 6-layer decoder
  florence-2-base  Florence2ForConditionalGeneration: DaViT embed_dim (128, 256, 512, 1024), depths (1, 1, 9, 1),
                   heads (4, 8, 16, 32), window 12, projection 768; BART 768 wide, 6 + 6 layers, 12 heads, FFN
                   3072; 768-px input -> 577 image tokens
  smolvlm-256m     Idefics3ForConditionalGeneration: SigLIP 768 wide, 12 layers, 12 heads, 512 px, patch 16;
                   Llama (SmolLM2-135M) 576 wide, 30 layers, 9 heads / 3 KV heads, FFN 1536, vocab 49,280;
                   scale factor 4 -> 64 image tokens for its one 512-px tile

A forward hook checks every run's image token count (577, 64), so a wrong config fails loudly.

Preprocessing: BLIP's and GIT's processor classes at their defaults. Florence-2-base's and SmolVLM-256M's
hub preprocessor configs cannot be fetched here, so their values are written out below. SmolVLM's own
default splits a 640x480 image into 12 tiles of 512 px plus a global one (13 x 64 = 832 image tokens); we
turn splitting off, so it sees one 512-px tile, its minimum cost (as issue 16 measured it): its figure is
a lower bound, the speed-up over it a conservative one.

Tokenizers: BLIP and GIT use bert-base-uncased's WordPiece, which ships with minivlm. Florence-2's and
SmolVLM's vocabularies do not and cannot be downloaded, so their prompts are token ids of the real
prompt's length (the image tokens at the processor's places), and output ids become text through a
stand-in table of the vocabulary's size: a table look-up is what detokenising costs.
"""

from __future__ import annotations

from typing import Callable

import torch

TOKENS = 20
PEERS = ("blip-base", "git-base", "florence-2-base", "smolvlm-256m")
IMAGE_TOKENS = {"florence-2-base": 577, "smolvlm-256m": 64}  # issue 16; per tile for SmolVLM

# Florence-2: "<CAPTION>" becomes "What does the image describe?": <s> + 6 BART tokens + </s>, after the image
# tokens. The port's <image> id lies past BART's 51,289 rows; any row costs the same (its embedding is replaced).
FLORENCE_VOCAB, FLORENCE_IMAGE_ID, FLORENCE_PROMPT = 51289, 51288, [0, 2264, 473, 5, 2274, 6190, 116, 2]
# SmolVLM's chat prompt "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:",
# its one tile expanded as the processor does: <fake_token_around_image><global-img> 64 x <image> <fake...>.
SMOL_VOCAB, SMOL_IMAGE_ID, SMOL_AROUND, SMOL_GLOBAL = 49280, 49190, 49189, 49152
SMOL_BEFORE, SMOL_AFTER = [1, 11126, 42], [4096, 346, 5309, 451, 2443, 47, 49279, 198, 9519, 9531, 42]


def count_image_tokens(module: torch.nn.Module, expected: int, name: str) -> None:
    """Fails the run when the module (the one that yields the image tokens) yields another number."""
    def check(_m, _inputs, out):
        if out.shape[1] != expected:
            raise AssertionError(f"{name}: {out.shape[1]} image tokens, expected {expected}: wrong config")
    module.register_forward_hook(check)


def stand_in_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def build_florence():
    import transformers as tf

    vision = tf.Florence2VisionConfig(embed_dim=(128, 256, 512, 1024), depths=(1, 1, 9, 1), num_heads=(4, 8, 16, 32),
                                      num_groups=(4, 8, 16, 32), window_size=12, projection_dim=768)
    text = tf.BartConfig(vocab_size=FLORENCE_VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
                         encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                         decoder_ffn_dim=3072)
    model = tf.Florence2ForConditionalGeneration(
        tf.Florence2Config(vision_config=vision, text_config=text, image_token_id=FLORENCE_IMAGE_ID)).eval()
    # Florence-2-base's preprocessor_config.json: CLIPImageProcessor, 768x768 bicubic, no crop, ImageNet mean/std
    proc = tf.CLIPImageProcessor(size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768},
                                 do_center_crop=False, resample=3, image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225])
    count_image_tokens(model.model.multi_modal_projector, IMAGE_TOKENS["florence-2-base"], "florence-2-base")
    return model, proc


def build_smolvlm():
    import transformers as tf

    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=512, patch_size=16)
    text = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, intermediate_size=1536, vocab_size=SMOL_VOCAB, max_position_embeddings=8192,
                rope_theta=100000.0, tie_word_embeddings=False)
    model = tf.Idefics3ForConditionalGeneration(
        tf.Idefics3Config(vision_config=vision, text_config=text, scale_factor=4, image_token_id=SMOL_IMAGE_ID,
                          pad_token_id=2)).eval()
    # SmolVLM-256M's preprocessor_config.json (Idefics3ImageProcessor: 512-px tiles, mean/std 0.5), splitting off
    proc = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 2048},
                                     max_image_size={"longest_edge": 512}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    count_image_tokens(model.model.connector, IMAGE_TOKENS["smolvlm-256m"], "smolvlm-256m")
    return model, proc


def captioner(name: str) -> tuple[torch.nn.Module, Callable[[list], list[str]]]:
    """(model, run): run(image paths) -> captions; run.new_tokens is the last run's count of new tokens."""
    import transformers as tf

    from minivlm.data.images import load_image
    from minivlm.text.tokenizer import get_tokenizer

    torch.manual_seed(0)
    gen = dict(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, num_beams=1)
    if name in ("blip-base", "git-base"):
        if name == "blip-base":
            model, proc = tf.BlipForConditionalGeneration(tf.BlipConfig()).eval(), tf.BlipImageProcessor()
        else:
            model, proc = tf.GitForCausalLM(tf.GitConfig()).eval(), tf.CLIPImageProcessor()
        tok = get_tokenizer()  # both use bert-base-uncased's WordPiece vocabulary

        def run(paths: list) -> list[str]:
            pixels = proc(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
            out = model.generate(pixel_values=pixels, **gen)
            run.new_tokens = out.shape[1] - 1  # both start from one [CLS]/BOS token
            return [tok.decode([t for t in row if t < tok.vocab_size]) for row in out.tolist()]
    elif name == "florence-2-base":
        model, proc = build_florence()

        def run(paths: list) -> list[str]:
            pixels = proc(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
            ids = torch.tensor([[FLORENCE_IMAGE_ID] * IMAGE_TOKENS[name] + FLORENCE_PROMPT] * len(paths))
            out = model.generate(input_ids=ids, pixel_values=pixels, **gen)
            run.new_tokens = out.shape[1] - 1  # the decoder starts from one </s>
            return [stand_in_text(row[1:]) for row in out.tolist()]
    elif name == "smolvlm-256m":
        model, proc = build_smolvlm()

        def run(paths: list) -> list[str]:
            inputs = proc(images=[[load_image(p)] for p in paths], return_tensors="pt")
            tiles = inputs["pixel_values"].shape[1]
            assert tiles == 1, f"smolvlm-256m: {tiles} tiles per image, expected its minimum, 1"
            image = [SMOL_AROUND, SMOL_GLOBAL] + [SMOL_IMAGE_ID] * IMAGE_TOKENS[name] + [SMOL_AROUND]
            ids = torch.tensor([SMOL_BEFORE + image + SMOL_AFTER] * len(paths))
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, **gen)
            run.new_tokens = out.shape[1] - ids.shape[1]
            return [stand_in_text(row[ids.shape[1]:]) for row in out.tolist()]
    else:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    run.params = sum(p.numel() for p in model.parameters())
    return model, run
