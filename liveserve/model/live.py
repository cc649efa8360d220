"""The LIVE model: vision tower -> connector (Linear, GELU, Linear) -> causal LM, plus the stream template.

Frame features (the vision tower's output) are what Perception sends and what training reads; the
connector maps them into the LM's embedding space at the <v> slots. The LM runs with the "liveserve"
attention backend so sessions own their KV storage.
"""

from __future__ import annotations

import torch
from torch import nn

from liveserve.model.attention import KVStep
from liveserve.model.forward.direct_forward import DirectForward
from liveserve.model.template import StreamTemplate
from liveserve.model.vision import FrameLayout, VisionEncoder


def build_connector(vision_hidden: int, hidden: int) -> nn.Sequential:
    # Same module indices as VideoLLM-online (connector.0 / connector.2), so its weights load as-is.
    return nn.Sequential(nn.Linear(vision_hidden, hidden, bias=True), nn.GELU(), nn.Linear(hidden, hidden, bias=True))


class LiveModel(DirectForward, nn.Module):
    family = "live"

    def __init__(self, lm: nn.Module, connector: nn.Module, template: StreamTemplate, layout: FrameLayout,
                 vision: VisionEncoder | None, *, vision_hidden_size: int, frame_size: int, system_prompt: str,
                 name: str = "") -> None:
        super().__init__()
        self.lm, self.connector, self.vision = lm, connector, vision
        self.template, self.layout = template, layout
        self.vision_hidden_size, self.frame_size = vision_hidden_size, frame_size
        self.system_prompt, self.name = system_prompt, name
        text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.max_positions = text.max_position_embeddings
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size

    @property
    def device(self) -> torch.device:
        return self.connector[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.connector[0].weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.lm.model.rotary_emb.inv_freq

    def _unread_mask(self) -> torch.Tensor:
        mask = getattr(self, "_unread", None)
        if mask is None or mask.device != self.device:
            mask = self._unread = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        return mask

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, S, S] -> vision features [N, tokens_per_frame, vision_hidden]."""
        if self.vision is None:
            raise RuntimeError(f"model {self.name!r} was loaded without a vision tower; send frame features instead")
        return self.vision(pixels.to(self.device))

    def embed_frames(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N, tokens_per_frame, vision_hidden] -> LM embeddings [N * tokens_per_frame, hidden]."""
        out = self.connector(features.to(self.device, self.dtype))
        return out.reshape(-1, out.shape[-1])

    def embed_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.lm.get_input_embeddings()(ids)

    def step_inputs(self, steps) -> dict[str, torch.Tensor]:
        """What a step of these sessions' inputs needs on the device, planned on the host (the engine sends
        it with the step's attention indices): every text id, each packed token's position, where the
        embedding rows go (all ids are embedded first, then all frame tokens), and the frames' features
        when they are on the host."""
        ids = [i for step in steps for i in step.ids]
        inputs = {"ids": torch.tensor(ids, dtype=torch.long),
                  "positions": torch.cat([step.positions for step in steps])}
        features = [step.features for step in steps if step.features is not None]
        if features and all(f.device.type == "cpu" for f in features):
            # Pushed as host tensors (the Decision service's frames): stacked here, so they cross in one copy
            # instead of one per frame; features encoded on the device stay there.
            inputs["features"] = torch.stack(features)
        if len(steps) > 1 and features:
            frame_tokens, order, next_id, next_frame = self.layout.num_tokens, [], 0, len(ids)
            for step in steps:
                order.extend(range(next_id, next_id + len(step.ids)))
                next_id += len(step.ids)
                if step.features is not None:
                    order.extend(range(next_frame, next_frame + frame_tokens))
                    next_frame += frame_tokens
            inputs["order"] = torch.tensor(order, dtype=torch.long)
        return inputs

    def embed_step(self, steps, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Pack the inputs of one or more sessions' steps (each: text ids, then optional frame features)
        into one [total_tokens, hidden] sequence, with one embedding lookup and one connector call.
        `inputs`: `step_inputs(steps)` on the device (by default made and sent here)."""
        inputs = inputs if inputs is not None else {k: v.to(self.device) for k, v in self.step_inputs(steps).items()}
        features = [step.features for step in steps if step.features is not None]
        pieces = []
        if inputs["ids"].numel():
            pieces.append(self.lm.get_input_embeddings()(inputs["ids"]))
        if features:
            stacked = inputs.get("features")
            pieces.append(self.embed_frames(stacked if stacked is not None else
                                            torch.stack([f.to(self.device) for f in features])))
        table = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        order = inputs.get("order")
        return table if order is None else table[order]  # ids then frame tokens, per session

    def decoder_and_head(self) -> tuple[nn.Module, nn.Module]:
        return self.lm.model, self.lm.lm_head

    def forward_step(self, embeds: torch.Tensor, positions: torch.Tensor, step: KVStep,
                     logits_at: torch.Tensor) -> torch.Tensor:
        """One forward over packed new tokens [T, hidden] at `positions` [T]; returns fp32 logits at the
        packed indices `logits_at` (each sequence's last token, typically)."""
        run = self.step_forward()
        if run is not None:
            return run(embeds, positions, step, logits_at)
        # The step's own attention masks each cache itself: a ready-made 4D mask makes transformers skip
        # building a [T, T] causal mask every forward that nothing would read.
        out = self.lm.model(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False, kv_step=step,
                            attention_mask=self._unread_mask())
        hidden = out.last_hidden_state[0, logits_at]
        return self.lm.lm_head(hidden).float()
