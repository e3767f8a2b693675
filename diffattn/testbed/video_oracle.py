"""The video oracle: read a clip of the moving-shapes world (``video.py``) back into moving objects.

``parse_clip(frames)`` works in three steps:

1. **Frames.** Every frame is read by the image oracle (``oracle.parse``): objects with colour,
   shape, centre and size. Frames the oracle finds no world backdrop in (background
   ``"other"``: noise, a coloured field) are counted.
2. **Tracks.** Detections are linked frame to frame by a one-to-one assignment (Hungarian,
   ``scipy.optimize.linear_sum_assignment``) on the distance from each track's predicted
   centre (last centre + last velocity x the frames since) plus ``SHAPE_PENALTY`` px for a
   change of shape; a link longer than ``MAX_STEP`` px per frame is refused and the detection
   starts a new track. Colour is not used to link (objects may change colour). Tracks present
   in at least ``MIN_PRESENCE`` of the frames are objects; shorter ones are fragments.
3. **Motion.** Per track, a least-squares line through its centres over frame index gives the
   velocity (px per frame) and the **smoothness** residual (RMS distance of the centres from
   the line, px). The **direction** is the sign of the velocity on its dominant axis: "still"
   below ``MIN_SPEED``; "unreadable" when the track is too short (fewer than 3 frames), not
   straight (off-axis speed above ``MAX_OFF_AXIS`` of the on-axis speed: no world direction)
   or erratic (residual above ``MAX_DIRECTION_RESIDUAL``). **Identity**: the track keeps one
   shape in every present frame, and its colours form at most two runs. The **colour call**
   is "steady" (one run), "change" (two runs of at least ``MIN_RUN`` frames: first colour ->
   second) or "unreadable" (flicker: more runs, or a run of one frame).

A clip is **unreadable** (status, with the reason) instead of being guessed at when more than
``MAX_OTHER_SHARE`` of its frames have no world backdrop, or when more than ``MAX_FRAGMENT_SHARE``
of its detections fall in fragments (ragged clips whose objects come and go). A plain clip with
nothing in it is readable: it has no objects.

``score_clip(frames, prompt)`` matches the caption's objects one to one with the tracks (exact
shape and start colour first; end colour and direction break ties) and grades each: found
(shape and start colour), direction, colour behaviour (the asked change, or none), smooth
(identity kept and residual at most ``MAX_RESIDUAL``), and per frame whether it is visible with
its shape and one of its colours. ``video_metrics`` turns many clip scores into rates with 95%
Wilson intervals (``evaluate.rate_metric``); ``evaluate_video`` runs a pipeline over
(prompt, seed) pairs; ``video_oracle_accuracy`` measures the oracle on rendered clips.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ..errors import UsageError
from . import oracle
from .evaluate import Metric, eval_seeds, rate_metric
from .video import DIRECTIONS, FRAMES, MotionSpec, VideoSpec, parse_video_prompt, render_clip, sample_training_clip, \
    spec_of, to_frames, video_caption

MAX_STEP = 8.0  # px per frame a link may deviate from the predicted centre (the world moves at most 2.5)
SHAPE_PENALTY = 6.0  # px added to a link's cost when the shape differs (a misread frame may still link)
MIN_PRESENCE = 2 / 3  # share of frames a track must be seen in to be an object
MIN_SPEED = 0.4  # px per frame: slower tracks stand "still" (the world's movers go at least 1.0)
MAX_OFF_AXIS = 0.5  # off-axis / on-axis speed above this: not a world direction ("unreadable")
MAX_RESIDUAL = 1.5  # px: RMS residual of the linear fit up to this is smooth motion (clean renders: < 0.5)
MAX_DIRECTION_RESIDUAL = 4.0  # px: above this the track is erratic and its direction "unreadable"
MIN_RUN = 2  # frames a colour must hold to count as one side of a colour change
MAX_OTHER_SHARE = 1 / 3  # frames without a world backdrop above this share: the clip is unreadable
MAX_FRAGMENT_SHARE = 1 / 3  # detections in fragments above this share: the clip is unreadable (ragged)
UNREADABLE = oracle.UNREADABLE


@dataclass
class Track:
    """One object followed through a clip."""

    frames: list[int]  # frame indices where it was seen
    detections: list[oracle.DetectedObject]  # one per entry of ``frames``
    n_frames: int  # frames in the clip
    shape: str = ""  # the shape seen most often
    colors: list[str] = field(default_factory=list)  # colour per present frame
    color_call: str = ""  # "steady" | "change" | "unreadable"
    start_color: str = ""
    end_color: str = ""
    velocity: tuple[float, float] = (0.0, 0.0)  # px per frame (x right, y down)
    residual: float = float("nan")  # px: RMS distance of the centres from the fitted line
    direction: str = ""  # "left" | "right" | "up" | "down" | "still" | "unreadable"
    identity_consistent: bool = False  # one shape in every present frame, at most two colour runs

    @property
    def presence(self) -> float:
        return len(self.frames) / self.n_frames

    @property
    def speed(self) -> float:
        return float(math.hypot(*self.velocity))

    @property
    def smooth(self) -> bool:
        """Identity kept and the centres on a line (residual at most MAX_RESIDUAL)."""
        return self.identity_consistent and bool(self.residual <= MAX_RESIDUAL)

    def centres(self) -> np.ndarray:
        return np.array([d.centre for d in self.detections], dtype=np.float64)  # [n, 2]

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "detections"}
        d.update(presence=self.presence, speed=self.speed, smooth=self.smooth, centres=self.centres().tolist())
        return d


@dataclass
class ParsedClip:
    frames: list[oracle.Parsed]  # the image oracle's reading of every frame
    tracks: list[Track]  # objects: tracks seen in at least MIN_PRESENCE of the frames, longest first
    fragments: int  # detections left in tracks shorter than that
    status: str  # "ok" | "unreadable"
    reason: str = ""  # why unreadable

    @property
    def readable(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- parsing


def _link(parsed: list[oracle.Parsed]) -> list[Track]:
    """Tracks through the frames' detections: per frame, a Hungarian assignment of detections
    to tracks on (distance from the predicted centre + SHAPE_PENALTY if the shape differs);
    links farther than MAX_STEP px per frame apart are refused."""
    n = len(parsed)
    tracks: list[Track] = []
    for f, p in enumerate(parsed):
        dets = p.objects
        cost = np.full((len(tracks), len(dets)), np.inf)  # [tracks, detections]
        for i, t in enumerate(tracks):
            last, gap = t.detections[-1], f - t.frames[-1]
            px, py = last.cx, last.cy
            if len(t.frames) >= 2:  # constant-velocity prediction from the last two sightings
                prev = t.detections[-2]
                step = t.frames[-1] - t.frames[-2]
                px += (last.cx - prev.cx) / step * gap
                py += (last.cy - prev.cy) / step * gap
            for j, d in enumerate(dets):
                dist = math.hypot(d.cx - px, d.cy - py)
                if dist <= MAX_STEP * gap:
                    cost[i, j] = dist + (SHAPE_PENALTY if d.shape != last.shape else 0.0)
        taken = set()
        if tracks and dets:
            big = 1e6
            rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, big))
            for i, j in zip(rows, cols):
                if np.isfinite(cost[i, j]):
                    tracks[i].frames.append(f)
                    tracks[i].detections.append(dets[j])
                    taken.add(j)
        for j, d in enumerate(dets):
            if j not in taken:
                tracks.append(Track(frames=[f], detections=[d], n_frames=n))
    return tracks


def _runs(values: list[str]) -> list[tuple[str, int]]:
    """Consecutive runs of equal values: ["r", "r", "b"] -> [("r", 2), ("b", 1)]."""
    out: list[tuple[str, int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def line_fit(frames, centres) -> tuple[tuple[float, float], float]:
    """Least-squares line through centres [n, 2] over frame indices [n]: the velocity (px per
    frame) and the RMS distance of the centres from the line (px). Needs n >= 2."""
    t = np.asarray(frames, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)  # [n, 2]
    a = np.stack([t, np.ones_like(t)], axis=1)  # [n, 2] design matrix
    coef, *_ = np.linalg.lstsq(a, c, rcond=None)  # [2, 2]: rows slope, intercept
    resid = c - a @ coef  # [n, 2]
    return (float(coef[0, 0]), float(coef[0, 1])), float(np.sqrt((resid**2).sum(axis=1).mean()))


def direction_of(velocity: tuple[float, float], residual: float, n_seen: int) -> str:
    """The world direction of a fitted velocity (module notes, step 3)."""
    if n_seen < 3 or not residual <= MAX_DIRECTION_RESIDUAL:
        return UNREADABLE
    vx, vy = velocity
    major, minor = max(abs(vx), abs(vy)), min(abs(vx), abs(vy))
    if math.hypot(vx, vy) < MIN_SPEED:
        return "still"
    if minor > MAX_OFF_AXIS * major:
        return UNREADABLE
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _summarise(t: Track) -> Track:
    """Fill a linked track's shape, colours, fit, direction and identity."""
    shapes = [d.shape for d in t.detections]
    t.shape = max(dict.fromkeys(shapes), key=shapes.count)  # most frequent, first seen on ties
    t.colors = [d.color for d in t.detections]
    runs = _runs(t.colors)
    t.start_color, t.end_color = runs[0][0], runs[-1][0]
    if len(runs) == 1:
        t.color_call = "steady"
    elif len(runs) == 2 and min(n for _, n in runs) >= MIN_RUN:
        t.color_call = "change"
    else:
        t.color_call = UNREADABLE
    t.identity_consistent = len(set(shapes)) == 1 and t.shape in oracle.SHAPES and len(runs) <= 2
    if len(t.frames) >= 2:
        t.velocity, t.residual = line_fit(t.frames, t.centres())
    t.direction = direction_of(t.velocity, t.residual, len(t.frames))
    return t


def parse_clip(video) -> ParsedClip:
    """Objects, motion and colour of a clip (module notes): ``video`` is anything
    ``video.to_frames`` reads (PIL frames, [F, H, W, 3] arrays, [F, 3, H, W] tensors)."""
    frames = to_frames(video)
    if len(frames) < 3:
        raise UsageError(f"the video oracle reads clips of at least 3 frames, got {len(frames)}")
    parsed = [oracle.parse(f) for f in frames]
    n = len(parsed)
    tracks = [_summarise(t) for t in _link(parsed)]
    kept = sorted((t for t in tracks if t.presence >= MIN_PRESENCE - 1e-9), key=lambda t: -len(t.frames))
    fragments = sum(len(t.frames) for t in tracks if t.presence < MIN_PRESENCE - 1e-9)
    detections = sum(len(p.objects) for p in parsed)
    other = sum(p.background == "other" for p in parsed)
    status, reason = "ok", ""
    if other > MAX_OTHER_SHARE * n:
        status, reason = UNREADABLE, f"{other} of {n} frames show no world backdrop"
    elif detections and fragments > MAX_FRAGMENT_SHARE * detections:
        status, reason = UNREADABLE, f"ragged: {fragments} of {detections} detections link into no track"
    return ParsedClip(frames=parsed, tracks=kept, fragments=fragments, status=status, reason=reason)


# ----------------------------------------------------------------------------- scoring


@dataclass
class ClipScore:
    prompt: str
    requested: int
    found: list[bool]  # per requested object: a track of its shape and start colour
    direction_ok: list[bool]  # ... moving in the asked direction ("still" when none is asked)
    color_ok: list[bool]  # ... turning the asked colour, or keeping its colour when no change is asked
    smooth: list[bool]  # ... identity kept and centres on a line (Track.smooth)
    directions: list[str]  # the oracle's direction call per requested object ("missing" if unmatched)
    color_calls: list[str]  # "steady" | "change" | "unreadable" | "missing"
    frame_accuracy: float  # mean over frames and requested objects: visible with its shape and one of its colours
    asks_change: list[bool]  # per requested object: the caption asks a colour change
    extra_tracks: int = 0  # tracks no requested object explains
    status: str = "ok"
    reason: str = ""
    matched: list[int | None] = field(default_factory=list)  # per requested object: index in parsed.tracks
    parsed: ParsedClip | None = None

    @property
    def object_accuracy(self) -> float:
        return sum(self.found) / self.requested

    @property
    def direction_accuracy(self) -> float:
        return sum(self.direction_ok) / self.requested

    @property
    def color_accuracy(self) -> float:
        return sum(self.color_ok) / self.requested

    @property
    def all_present(self) -> bool:
        return all(self.found)

    @property
    def correct(self) -> bool:
        """Everything right: every object found, moving and colouring as asked, smoothly, nothing extra."""
        return (self.status == "ok" and all(self.found) and all(self.direction_ok) and all(self.color_ok)
                and all(self.smooth) and self.extra_tracks == 0)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "parsed"}
        if self.parsed is not None:
            d["tracks"] = [t.as_dict() for t in self.parsed.tracks]
        d.update(object_accuracy=self.object_accuracy, direction_accuracy=self.direction_accuracy,
                 color_accuracy=self.color_accuracy, all_present=self.all_present, correct=self.correct)
        return d


def _cost(want: MotionSpec, t: Track) -> float:
    """Cost of explaining a requested object by a track: shape and start colour weigh most, then
    the end colour and the direction (ties among equally good matchings)."""
    end = want.color_to or want.color
    want_dir = want.direction or "still"
    return (2.0 * (t.shape != want.shape) + 1.0 * (t.start_color != want.color) + 0.5 * (t.end_color != end)
            + 0.25 * (t.direction != want_dir) + 0.01 * (1 - t.presence))


def match_tracks(spec: VideoSpec, parsed: ParsedClip) -> list[int | None]:
    """One-to-one matching of the spec's objects to the clip's tracks (Hungarian on ``_cost``)."""
    out: list[int | None] = [None] * len(spec.objects)
    if not parsed.tracks:
        return out
    cost = np.array([[_cost(w, t) for t in parsed.tracks] for w in spec.objects])  # [requested, tracks]
    for i, j in zip(*linear_sum_assignment(cost)):
        out[int(i)] = int(j)
    return out


def _frame_accuracy(spec: VideoSpec, parsed: ParsedClip) -> float:
    """Mean over frames of the share of requested objects visible in that frame with their shape
    and their start or end colour (one detection per object)."""
    shares = []
    for p in parsed.frames:
        ok = np.array([[d.shape == w.shape and d.color in (w.color, w.color_to or w.color) for d in p.objects]
                       for w in spec.objects], dtype=float).reshape(len(spec.objects), len(p.objects))
        if ok.size:
            rows, cols = linear_sum_assignment(-ok)
            shares.append(ok[rows, cols].sum() / len(spec.objects))
        else:
            shares.append(0.0)
    return float(np.mean(shares))


def score_clip(video, prompt: str, parsed: ParsedClip | None = None) -> ClipScore:
    """Grade a clip against a caption of the clip grammar (module notes). An unreadable clip
    gets no object found and every call "unreadable" (its frame accuracy is still measured)."""
    try:
        spec = parse_video_prompt(prompt)
    except UsageError as e:
        raise UsageError(f"score_clip(): {e}") from None
    parsed = parsed if parsed is not None else parse_clip(video)
    n = len(spec.objects)
    frame_acc = _frame_accuracy(spec, parsed)
    asks = [o.color_to is not None for o in spec.objects]
    if not parsed.readable:
        return ClipScore(prompt, n, [False] * n, [False] * n, [False] * n, [False] * n, [UNREADABLE] * n,
                         [UNREADABLE] * n, frame_acc, asks, 0, parsed.status, parsed.reason, [None] * n, parsed)
    matched = match_tracks(spec, parsed)
    found, dirs_ok, colors_ok, smooth, dirs, calls = [], [], [], [], [], []
    for w, j in zip(spec.objects, matched):
        if j is None:
            found.append(False), dirs_ok.append(False), colors_ok.append(False), smooth.append(False)
            dirs.append("missing"), calls.append("missing")
            continue
        t = parsed.tracks[j]
        ok = t.shape == w.shape and t.start_color == w.color
        found.append(ok)
        dirs.append(t.direction)
        calls.append(t.color_call)
        dirs_ok.append(ok and t.direction == (w.direction or "still"))
        want_call = "change" if w.color_to else "steady"
        colors_ok.append(ok and t.color_call == want_call and t.end_color == (w.color_to or w.color))
        smooth.append(ok and t.smooth)
    extra = len(parsed.tracks) - sum(j is not None for j in matched)
    return ClipScore(prompt, n, found, dirs_ok, colors_ok, smooth, dirs, calls, frame_acc, asks, extra,
                     parsed.status, parsed.reason, matched, parsed)


def video_metrics(scores: list[ClipScore]) -> dict[str, Metric]:
    """Suite metrics, each a mean over clips with its 95% Wilson interval (``rate_metric``):
    object_accuracy, all_present, frame_object_accuracy, direction_accuracy, color_accuracy
    (per clip: the fraction of requested objects found / moving as asked / colouring as
    asked), change_accuracy (over clips asking a colour change: the changes seen),
    smooth_rate (over clips with an object found: the share of found objects moving smoothly),
    unreadable_rate, extra_track_rate and correct. Intervals are over clips, the sampled unit
    (the objects of one clip are not independent)."""
    out = {
        "object_accuracy": rate_metric([s.object_accuracy for s in scores]),
        "all_present": rate_metric([s.all_present for s in scores]),
        "frame_object_accuracy": rate_metric([s.frame_accuracy for s in scores]),
        "direction_accuracy": rate_metric([s.direction_accuracy for s in scores]),
        "color_accuracy": rate_metric([s.color_accuracy for s in scores]),
    }
    changes = [s for s in scores if any(s.asks_change)]
    if changes:
        out["change_accuracy"] = rate_metric(
            [np.mean([ok for ok, a in zip(s.color_ok, s.asks_change) if a]) for s in changes])
    with_found = [s for s in scores if any(s.found)]
    if with_found:
        out["smooth_rate"] = rate_metric([np.mean([sm for sm, f in zip(s.smooth, s.found) if f]) for s in with_found])
    out["unreadable_rate"] = rate_metric([s.status != "ok" for s in scores])
    out["extra_track_rate"] = rate_metric([s.extra_tracks > 0 for s in scores])
    out["correct"] = rate_metric([s.correct for s in scores])
    return out


def metrics_markdown(metrics: dict[str, Metric], title: str = "") -> str:
    """A table row per metric: value, 95% interval, n."""
    head = f"metric ({title})" if title else "metric"
    rows = [f"| {head} | value | 95% CI | n |", "|---|---|---|---|"]
    rows += [f"| {k} | {m.value:.3f} | [{m.low:.3f}, {m.high:.3f}] | {m.n} |" for k, m in metrics.items()]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- harness


@dataclass
class VideoReport:
    scores: list[ClipScore]
    seeds: list[int]
    clips: list = field(default_factory=list)  # uint8 [F, H, W, 3] per clip, when return_clips=True
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def metrics(self) -> dict[str, Metric]:
        return video_metrics(self.scores)

    def to_markdown(self, title: str = "") -> str:
        return metrics_markdown(self.metrics(), title)

    def as_dict(self, per_clip: bool = True) -> dict:
        d = {"n_clips": len(self), "settings": self.settings,
             "metrics": {k: m._asdict() for k, m in self.metrics().items()}}
        if per_clip:
            d["clips"] = [dict(s.as_dict(), seed=seed) for s, seed in zip(self.scores, self.seeds)]
        return d


def evaluate_video(pipe, prompts=None, seeds=None, *, pairs=None, batch_size: int = 4, num_frames: int = FRAMES,
                   progress: bool = True, return_clips: bool = False, **call_kwargs) -> VideoReport:
    """Generate one clip per (prompt, seed) and grade it with the video oracle.

    Clip i pairs ``prompts[i % len(prompts)]`` with ``seeds[i]`` (or pass ``pairs``), as
    ``evaluate.evaluate``; each clip comes from ``torch.Generator().manual_seed(seed)``.
    ``pipe`` is a ``WanPipeline`` (or any callable returning ``.frames`` [B, F, H, W, 3] in [0, 1]
    for ``output_type="np"``); ``call_kwargs`` go to it (steps, guidance, height, width)."""
    if pairs is None:
        if not prompts or seeds is None:
            raise UsageError("evaluate_video() needs prompts and seeds (clip i: prompts[i % len(prompts)], seeds[i]) "
                             "or pairs=[(prompt, seed), ...]")
        prompts = list(prompts)
        pairs = [(prompts[i % len(prompts)], int(s)) for i, s in enumerate(seeds)]
    pairs = [(p, int(s)) for p, s in pairs]
    for p in dict.fromkeys(p for p, _ in pairs):
        parse_video_prompt(p)  # a UsageError names the grammar
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    plain = (int, float, str, bool, type(None))
    settings = {"batch_size": batch_size, "num_frames": num_frames,
                **{k: v if isinstance(v, plain) else repr(v) for k, v in call_kwargs.items()}}
    report = VideoReport(scores=[], seeds=[], settings=settings)
    call_kwargs.setdefault("output_type", "np")
    bar = tqdm(total=len(pairs), desc="evaluate video", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        videos = pipe(prompt=[p for p, _ in chunk], generator=gens, num_frames=num_frames, **call_kwargs).frames
        if len(videos) != len(chunk):
            raise UsageError(f"the pipeline returned {len(videos)} clips for {len(chunk)} prompts; pass num_videos_per_prompt=1")
        for (p, s), v in zip(chunk, videos):
            frames = to_frames(v)
            report.scores.append(score_clip(frames, p))
            report.seeds.append(s)
            if return_clips:
                report.clips.append(np.stack([np.asarray(f) for f in frames]))
        bar.update(len(chunk))
    bar.close()
    return report


# ----------------------------------------------------------------------------- oracle accuracy


def video_oracle_accuracy(n: int = 300, strength: float = 0.0, seed: int = 0, frames: int = FRAMES,
                          progress: bool = False) -> dict[str, float]:
    """How the oracle reads rendered clips of the training distribution
    (``video.sample_training_clip`` of the first ``n`` evaluation seeds, never used to set its
    thresholds), degraded per frame by ``oracle.perturb`` at ``strength`` (0: clean; ``seed``
    seeds the degradation). Per object: found (a track of its shape and start colour),
    direction and colour behaviour, each right, "unreadable", or wrong (a found object's
    readable call that is not the truth: a guess the oracle should not make; the rest are
    objects not found); per clip: correct, unreadable; and the largest error
    of a found mover's fitted velocity (px per frame)."""
    rng = np.random.default_rng([seed, 77])
    c = {k: 0 for k in ("objects", "found", "direction_ok", "direction_unreadable", "direction_wrong", "color_ok",
                        "color_unreadable", "color_wrong", "changes", "change_ok", "smooth", "clips_correct",
                        "clips_unreadable")}
    err = 0.0
    for s in tqdm(eval_seeds(n), desc="video oracle", disable=not progress):
        clip = sample_training_clip(s, frames)
        video = render_clip(clip)
        if strength > 0:
            video = [oracle.perturb(f, rng, strength) for f in video]
        sc = score_clip(video, video_caption(clip))
        c["clips_correct"] += sc.correct
        c["clips_unreadable"] += sc.status != "ok"
        for k, o in enumerate(clip.objects):
            c["objects"] += 1
            c["found"] += sc.found[k]
            for name, ok, call in (("direction", sc.direction_ok[k], sc.directions[k]),
                                   ("color", sc.color_ok[k], sc.color_calls[k])):
                c[f"{name}_ok"] += ok
                c[f"{name}_unreadable"] += call == UNREADABLE
                c[f"{name}_wrong"] += sc.found[k] and call != UNREADABLE and not ok  # a confident wrong call
            c["smooth"] += sc.smooth[k]
            if o.color_to:
                c["changes"] += 1
                c["change_ok"] += sc.color_ok[k]
            j = sc.matched[k] if sc.matched else None
            if sc.found[k] and j is not None and o.direction:
                true_v = np.subtract(o.centre(1), o.centre(0))
                err = max(err, float(np.abs(np.subtract(sc.parsed.tracks[j].velocity, true_v)).max()))
    k = c["objects"]
    return {"clips": n, "objects": k, "strength": strength,
            "object_accuracy": c["found"] / k,
            "direction_accuracy": c["direction_ok"] / k, "direction_unreadable": c["direction_unreadable"] / k,
            "direction_wrong": c["direction_wrong"] / k,
            "color_accuracy": c["color_ok"] / k, "color_unreadable": c["color_unreadable"] / k,
            "color_wrong": c["color_wrong"] / k,
            "changes": c["changes"], "change_accuracy": c["change_ok"] / max(1, c["changes"]),
            "smooth_rate": c["smooth"] / k, "correct": c["clips_correct"] / n,
            "unreadable_rate": c["clips_unreadable"] / n, "max_velocity_error": err}


__all__ = ["Track", "ParsedClip", "ClipScore", "VideoReport", "parse_clip", "score_clip", "match_tracks",
           "line_fit", "direction_of", "video_metrics", "metrics_markdown", "evaluate_video",
           "video_oracle_accuracy", "spec_of", "DIRECTIONS"]
