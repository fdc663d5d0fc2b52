"""NumPy renderer of the synthetic multi-spectral vehicle re-ID dataset.

Each sample is an aligned RGB / near-infrared (NI) / thermal (TI) triplet of a
procedurally generated vehicle seen from an elevated traffic camera: the front
face (bumper, grille, headlamps, plate) at the bottom of the image, then hood,
windshield and roof (and a cargo box for trucks) further up.

Identity cues live in all three modalities:
  RGB  body colour, silhouette and proportions (car / van / truck), decals,
       grille and lamp design, licence-plate pattern.
  NI   material-dependent grey levels: the body paint's NIR reflectance, dark
       glass and tyres, a bright retroreflective plate.
  TI   a blurred heat signature: engine (per-identity position and size),
       wheels and exhaust hotter than the body, glass cold.

Each of the cameras has its own viewpoint (scale, rotation, shear, tilt,
offset, possibly mirrored) and its own background. Samples vary by small pose
jitter, day or night (night RGB is dark and noisy, NI is actively illuminated
and barely affected, TI is unaffected), motion blur, and flare: headlamp glare
or sun flare that saturates regions of RGB and NI (values >= 250) but never TI
(TI never exceeds `TI_MAX_VALUE`). The pixels a flare saturated are returned as
ground-truth masks.

Everything is a pure function of (RenderConfig, seed, pid, camid, index): each
identity, camera and sample draws from its own `np.random.default_rng` stream,
so samples do not depend on the order in which they are generated. Train and
test identities use disjoint pid ranges, so the pid also separates the splits.
Rendering is vectorised over pixels.

One file, though long: the vehicle, camera, background, night and flare
parts draw from the same per-(identity, camera, sample) random streams and
pixel grids, and the dataset's determinism rests on their order of draws,
which is easiest to keep true where it can be read in one place.
"""

import dataclasses
import functools
import math

import numpy as np

from input_pipeline.datasets import features

# Largest uint8 value a TI image can take: thermal cameras do not see flare.
TI_MAX_VALUE = 220
# Largest albedo/reflectance of a clean surface, so clean images rarely reach
# the saturation threshold (the flare pseudo-label must stay 0 without flare).
_MAX_ALBEDO = 0.9
# A pixel belongs to a flare mask only where the flare itself added at least
# this much (in [0, 1] units): saturation elsewhere is not the flare's doing.
_MASK_MIN_FLARE = 0.05

# Distinct tags keep the random streams of cameras, identities and samples apart.
_TAG_CAMERA = 101
_TAG_IDENTITY = 202
_TAG_SAMPLE = 303

SHAPES = ("car", "van", "truck")
_SHAPE_PROBS = (0.6, 0.25, 0.15)
FLARE_TYPES = ("none", "headlamp", "sun")

# Body colours, most common first; `RenderConfig.num_colors` takes a prefix.
PALETTE = np.array([
    (0.88, 0.88, 0.86),  # white
    (0.07, 0.07, 0.08),  # black
    (0.62, 0.63, 0.65),  # silver
    (0.33, 0.34, 0.36),  # grey
    (0.70, 0.09, 0.09),  # red
    (0.12, 0.22, 0.58),  # blue
    (0.80, 0.72, 0.52),  # beige
    (0.13, 0.38, 0.18),  # green
    (0.88, 0.72, 0.10),  # yellow
    (0.88, 0.42, 0.10),  # orange
    (0.07, 0.11, 0.30),  # dark blue
    (0.40, 0.24, 0.13),  # brown
    (0.45, 0.09, 0.27),  # maroon
    (0.32, 0.62, 0.78),  # light blue
    (0.52, 0.62, 0.20),  # olive
    (0.22, 0.46, 0.46),  # teal
], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """Image size and difficulty knobs of the renderer.

  Attributes:
    height: image height in pixels.
    width: image width in pixels.
    num_cameras: number of cameras (each with its own viewpoint/background).
    num_colors: how many distinct body colours identities draw from (a prefix
      of `PALETTE`, 1..16); fewer colours make identities more alike.
    color_jitter: standard deviation of the per-identity perturbation of the
      palette colour (0 = identities of one colour share it exactly), <= 1.
    shape_jitter: (0..2) scale of the per-identity variation of the proportions
      around the car/van/truck prototypes (0 = one silhouette per class).
    near_duplicate_prob: probability that an identity copies one of the 8
      previous pids and changes only its plate and one more cue (hard
      negatives).
    viewpoint_variation: (0..3) scale of the differences between cameras (rotation,
      shear, tilt, offset, zoom, mirroring); 0 = all cameras see the same view.
    pose_jitter: (0..3) scale of the per-sample pose change within one camera.
    noise_std: sensor noise standard deviation in [0, 1] units (daytime RGB;
      night RGB gets 3x more, night NI 1.5x, TI 0.5x), <= 1.
    blur_prob: probability of motion blur on a sample.
    night_prob: probability that a sample is taken at night.
    flare_prob: probability of flare (headlamp glare or sun flare).
    flare_strength: (0..10) multiplier of the flare intensity (1 = default mix, where
      most flares saturate more than 10% of the channel values).
    sun_flare_share: share of daytime flares that are sun flare (the rest and
      every night flare is headlamp glare).
  """
  height: int = 128
  width: int = 64
  num_cameras: int = 8
  num_colors: int = 12
  color_jitter: float = 0.05
  shape_jitter: float = 1.0
  near_duplicate_prob: float = 0.15
  viewpoint_variation: float = 1.0
  pose_jitter: float = 1.0
  noise_std: float = 0.02
  blur_prob: float = 0.2
  night_prob: float = 0.3
  flare_prob: float = 0.3
  flare_strength: float = 1.0
  sun_flare_share: float = 0.6

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    if self.height < 16 or self.width < 8:
      raise ValueError(
          f"RenderConfig.height/width must be >= 16/8, got {self.height}x{self.width}")
    if self.num_cameras < 1:
      raise ValueError(f"RenderConfig.num_cameras must be >= 1, got {self.num_cameras}")
    if not 1 <= self.num_colors <= len(PALETTE):
      raise ValueError(f"RenderConfig.num_colors must be in [1, {len(PALETTE)}], "
                       f"got {self.num_colors}")
    for name in ("near_duplicate_prob", "blur_prob", "night_prob", "flare_prob",
                 "sun_flare_share"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"RenderConfig.{name} must be in [0, 1], got {value}")
    # Upper bounds keep the sampled proportions and camera zooms positive.
    for name, top in (("color_jitter", 1.0), ("shape_jitter", 2.0),
                      ("viewpoint_variation", 3.0), ("pose_jitter", 3.0),
                      ("noise_std", 1.0), ("flare_strength", 10.0)):
      value = getattr(self, name)
      if not 0.0 <= value <= top:
        raise ValueError(f"RenderConfig.{name} must be in [0, {top}], got {value}")


@dataclasses.dataclass(frozen=True, eq=False)  # Holds arrays.
class Camera:
  """One camera: viewpoint and background (all lengths in image heights)."""
  zoom: float
  rotation: float  # radians
  shear: float
  tilt: float  # vertical foreshortening of the vehicle
  offset: tuple[float, float]
  mirrored: bool
  white_balance: np.ndarray  # (3,) RGB gains
  horizon: float  # image Y of the far-scene boundary (Y up, centre 0)
  far_kind: int  # 0 buildings, 1 vegetation, 2 sky
  far_material: np.ndarray  # (5,) RGB, NI, TI of the far scene
  road_material: np.ndarray  # (5,)
  lane_x: tuple[float, ...]  # lane markings: X at the image centre line
  lane_slope: tuple[float, ...]  # dX/dY of each marking
  lane_material: np.ndarray  # (5,)
  texture_seed: int


@dataclasses.dataclass(frozen=True, eq=False)  # Holds arrays.
class Identity:
  """Appearance of one vehicle (lengths in vehicle widths, y up from bumper)."""
  shape: int  # index into SHAPES
  half_width: float
  front_height: float
  hood_length: float
  windshield_length: float
  roof_length: float
  cargo_length: float
  cabin_taper: float  # cabin top width / body width
  body: np.ndarray  # (5,) RGB albedo, NI reflectance, TI temperature
  roof: np.ndarray  # (5,)
  cargo: np.ndarray  # (5,)
  bumper: np.ndarray  # (5,)
  grille: np.ndarray  # (5,)
  grille_size: tuple[float, float]  # half width (x hw), height (x front)
  grille_slats: int
  lamp_kind: int  # 0 round, 1 rectangular, 2 slim
  lamp_pos: tuple[float, float]  # x (x hw), y (x front height)
  lamp_size: tuple[float, float]
  plate_x: float
  plate_yellow: bool
  plate_bits: np.ndarray  # (2, 10) bool glyph pattern
  decal_kind: int  # 0 none, 1 twin stripes, 2 offset stripe, 3 logo, 4 band
  decal: np.ndarray  # (5,)
  decal_pos: float
  sunroof: bool
  roof_rack: bool
  engine_pos: tuple[float, float]  # x (x hw), y (x total length)
  engine_radius: float
  engine_heat: float
  exhaust_side: int  # -1, 0, 1
  wheel_heat: float


@dataclasses.dataclass(frozen=True, eq=False)  # Holds arrays.
class Sample:
  """One rendered triplet with its ground truth.

  Attributes:
    rgb, ni, ti: uint8 (H, W, 3) images (NI and TI grey, repeated to 3).
    flare_mask_rgb, flare_mask_ni: uint8 (H, W, 1) in {0, 1}: the pixels the
      flare saturated (some channel >= 250) in that modality.
    vehicle_mask: bool (H, W), the vehicle's silhouette.
    night: whether the sample was taken at night.
    flare: one of FLARE_TYPES.
    blurred: whether motion blur was applied.
  """
  rgb: np.ndarray
  ni: np.ndarray
  ti: np.ndarray
  flare_mask_rgb: np.ndarray
  flare_mask_ni: np.ndarray
  vehicle_mask: np.ndarray
  night: bool
  flare: str
  blurred: bool


def _material(rgb, ni: float, ti: float) -> np.ndarray:
  """Packs an RGB albedo, NI reflectance and TI temperature into a (5,) vector."""
  return np.array([*np.clip(rgb, 0.0, _MAX_ALBEDO), min(ni, _MAX_ALBEDO), ti])


def _luma(rgb: np.ndarray) -> float:
  return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


@functools.lru_cache(maxsize=256)
def make_camera(config: RenderConfig, seed: int, camid: int) -> Camera:
  """Draws camera `camid`'s viewpoint and background (cached: do not modify).

  Args:
    config: renderer configuration.
    seed: dataset seed.
    camid: 0-based camera index.

  Returns:
    The Camera; the same for every split and sample.
  """
  rng = np.random.default_rng([seed, _TAG_CAMERA, camid])
  v = config.viewpoint_variation
  far_kind = int(rng.integers(0, 3))
  if far_kind == 0:  # Buildings: warm-ish walls, mid NI, mid temperature.
    wall = rng.uniform(0.35, 0.75) * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.6, 0.9)])
    far = _material(wall, rng.uniform(0.35, 0.6), rng.uniform(0.38, 0.48))
  elif far_kind == 1:  # Vegetation: dark green in RGB, bright in NI, cool.
    far = _material([0.12, rng.uniform(0.25, 0.4), 0.1], rng.uniform(0.65, 0.8),
                    rng.uniform(0.28, 0.36))
  else:  # Sky: bright blue-grey, mid NI, very cold.
    far = _material([0.55, 0.68, rng.uniform(0.8, 0.9)], rng.uniform(0.4, 0.55), 0.12)
  road_grey = rng.uniform(0.25, 0.45)
  road = _material(road_grey * np.array([1.0, 1.0, rng.uniform(0.95, 1.08)]),
                   road_grey * 0.8, rng.uniform(0.4, 0.5))
  lane = _material([0.85, 0.85, 0.8] if rng.random() < 0.6 else [0.85, 0.7, 0.15],
                   0.85, road[4] - 0.02)
  num_lanes = int(rng.integers(1, 3))
  return Camera(
      zoom=float(1.0 - rng.uniform(0.0, 0.15) * v),
      rotation=float(np.deg2rad(rng.uniform(-7.0, 7.0) * v)),
      shear=float(rng.uniform(-0.3, 0.3) * v),
      tilt=float(1.0 + rng.uniform(-0.18, 0.12) * v),
      offset=(float(rng.uniform(-0.025, 0.025) * v), float(rng.uniform(-0.04, 0.04) * v)),
      mirrored=bool(v > 0 and rng.random() < 0.5),
      white_balance=1.0 + rng.uniform(-0.08, 0.08, size=3) * min(v, 1.0),
      horizon=float(rng.uniform(0.22, 0.45)),
      far_kind=far_kind,
      far_material=far,
      road_material=road,
      lane_x=tuple(float(x) for x in rng.uniform(-0.3, 0.3, size=num_lanes)),
      lane_slope=tuple(float(s) for s in rng.uniform(-0.5, 0.5, size=num_lanes)),
      lane_material=lane,
      texture_seed=int(rng.integers(0, 2**31)),
  )


def _own_identity(config: RenderConfig, seed: int, pid: int) -> Identity:
  """Draws identity `pid`'s appearance, ignoring near-duplication."""
  rng = np.random.default_rng([seed, _TAG_IDENTITY, pid])
  j = config.shape_jitter
  shape = int(rng.choice(3, p=_SHAPE_PROBS))

  def around(value: float, spread: float) -> float:
    return float(value + rng.uniform(-spread, spread) * j)

  # Prototype proportions per class (vehicle widths), varied per identity.
  if shape == 0:
    front, hood, windshield, roof, cargo, taper = (
        around(0.30, 0.05), around(0.34, 0.08), around(0.30, 0.05),
        around(0.45, 0.12), 0.0, around(0.74, 0.05))
  elif shape == 1:
    front, hood, windshield, roof, cargo, taper = (
        around(0.40, 0.05), around(0.12, 0.05), around(0.40, 0.06),
        around(0.85, 0.15), 0.0, around(0.90, 0.04))
  else:
    front, hood, windshield, roof, cargo, taper = (
        around(0.50, 0.06), 0.04, around(0.42, 0.05),
        around(0.18, 0.05), around(0.85, 0.2), around(0.94, 0.03))

  color_index = int(rng.integers(0, config.num_colors))
  color = PALETTE[color_index] + rng.normal(0.0, config.color_jitter, size=3)
  # NIR reflectance of paint is only loosely tied to its visible colour.
  body_ni = 0.45 * _luma(np.clip(color, 0, 1)) + 0.5 * rng.uniform(0.1, 0.9)
  # Dark paint absorbs more sunlight: a warmer body in TI.
  body_ti = 0.42 + 0.12 * (1.0 - _luma(np.clip(color, 0, 1))) + rng.uniform(-0.03, 0.03)
  body = _material(color, body_ni, body_ti)
  two_tone = rng.random() < 0.15
  roof_mat = _material(PALETTE[int(rng.integers(0, 3))], rng.uniform(0.2, 0.8), 0.48) \
      if two_tone else body
  cargo_col = PALETTE[int(rng.choice([0, 0, 2, 3, int(rng.integers(0, len(PALETTE)))]))]
  # A quarter of the cargo boxes are refrigerated: cold in TI.
  cargo_ti = 0.3 if rng.random() < 0.25 else 0.45
  cargo_mat = _material(cargo_col + rng.normal(0, 0.03, 3), rng.uniform(0.3, 0.85), cargo_ti)
  bumper = body * np.array([0.85] * 4 + [1.0]) if rng.random() < 0.5 else \
      _material([0.1, 0.1, 0.11], 0.12, 0.5)
  chrome = rng.random() < 0.35
  grille = _material([0.55, 0.56, 0.58] if chrome else [0.06, 0.06, 0.07],
                     0.5 if chrome else 0.1, 0.6)
  decal_kind = int(rng.integers(0, 5))
  decal_color = PALETTE[int(rng.integers(0, len(PALETTE)))]
  if np.abs(decal_color - color).sum() < 0.3:  # Keep decals visible on the body.
    decal_color = 1.0 - decal_color
  engine_heat = rng.uniform(0.18, 0.32)
  return Identity(
      shape=shape,
      half_width=around(0.5, 0.02),
      front_height=front,
      hood_length=hood,
      windshield_length=windshield,
      roof_length=roof,
      cargo_length=cargo,
      cabin_taper=taper,
      body=body,
      roof=roof_mat,
      cargo=cargo_mat,
      bumper=bumper,
      grille=grille,
      grille_size=(float(rng.uniform(0.3, 0.65)), float(rng.uniform(0.2, 0.45))),
      grille_slats=int(rng.integers(2, 7)),
      lamp_kind=int(rng.integers(0, 3)),
      lamp_pos=(float(rng.uniform(0.62, 0.8)), float(rng.uniform(0.55, 0.8))),
      lamp_size=(float(rng.uniform(0.09, 0.15)), float(rng.uniform(0.05, 0.09))),
      plate_x=float(rng.choice([0.0, 0.0, rng.uniform(-0.2, 0.2)])),
      plate_yellow=bool(rng.random() < 0.3),
      plate_bits=rng.random((2, 10)) < 0.5,
      decal_kind=decal_kind,
      decal=_material(decal_color, rng.uniform(0.05, 0.9), 0.5),
      decal_pos=float(rng.uniform(-0.3, 0.2)),
      sunroof=bool(shape == 0 and rng.random() < 0.35),
      roof_rack=bool(shape != 2 and rng.random() < 0.25),
      engine_pos=(float(rng.uniform(-0.35, 0.35)), float(rng.uniform(0.08, 0.3))),
      engine_radius=float(rng.uniform(0.12, 0.3)),
      engine_heat=float(engine_heat),
      exhaust_side=int(rng.integers(-1, 2)),
      wheel_heat=float(rng.uniform(0.1, 0.25)),
  )


@functools.lru_cache(maxsize=4096)
def make_identity(config: RenderConfig, seed: int, pid: int) -> Identity:
  """Draws identity `pid`'s appearance (cached: do not modify).

  With probability `near_duplicate_prob` the identity is a near copy of one of
  the 8 previous pids: same everything except the plate and one more cue.

  Args:
    config: renderer configuration.
    seed: dataset seed.
    pid: vehicle id (>= 0).

  Returns:
    The Identity.
  """
  if pid < 0:
    raise ValueError(f"pid must be >= 0, got {pid}")
  rng = np.random.default_rng([seed, _TAG_IDENTITY, pid, 1])
  if pid == 0 or rng.random() >= config.near_duplicate_prob:
    return _own_identity(config, seed, pid)
  base = _own_identity(config, seed, pid - int(rng.integers(1, min(pid, 8) + 1)))
  changes = {"plate_bits": rng.random((2, 10)) < 0.5}
  cue = int(rng.integers(0, 4))
  if cue == 0:
    changes["decal_kind"] = (base.decal_kind + int(rng.integers(1, 5))) % 5
  elif cue == 1:
    changes["lamp_kind"] = (base.lamp_kind + int(rng.integers(1, 3))) % 3
  elif cue == 2:
    changes["engine_pos"] = (-base.engine_pos[0], base.engine_pos[1])
    changes["exhaust_side"] = -base.exhaust_side if base.exhaust_side else 1
  else:
    changes["grille_slats"] = 2 + (base.grille_slats - 2 + int(rng.integers(1, 4))) % 5
  return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------
# Vectorised 2-D primitives. Coordinates are arrays of one shape; the returned
# coverage ("alpha") is anti-aliased over `px`, the pixel size in those units.


def _coverage(distance: np.ndarray, px: float) -> np.ndarray:
  """Maps a signed distance (negative inside) to a [0, 1] pixel coverage."""
  return np.minimum(np.maximum(0.5 - distance / px, 0.0), 1.0)


def _box(x, y, cx, cy, hx, hy, px, radius=0.0):
  """Coverage of a rounded axis-aligned box with centre (cx, cy), half sizes."""
  radius = min(radius, hx, hy)
  qx = np.abs(x - cx) - (hx - radius)
  qy = np.abs(y - cy) - (hy - radius)
  outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
  inside = np.minimum(np.maximum(qx, qy), 0.0)
  return _coverage(outside + inside - radius, px)


def _trapezoid(x, y, y0, y1, hx0, hx1, px):
  """Coverage of a trapezoid centred on x = 0 from y0 (half width hx0) to y1."""
  t = np.clip((y - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
  half = hx0 + (hx1 - hx0) * t
  d = np.maximum(np.abs(x) - half, np.abs(y - 0.5 * (y0 + y1)) - 0.5 * (y1 - y0))
  return _coverage(d, px)


def _ellipse(x, y, cx, cy, a, b, px):
  d = (np.hypot((x - cx) / a, (y - cy) / b) - 1.0) * min(a, b)
  return _coverage(d, px)


def _paint(canvas: np.ndarray, alpha: np.ndarray, material) -> None:
  """Alpha-composites `material` ((5,) or (H, W, 5)) onto canvas in place."""
  a = alpha[..., None]
  canvas *= 1.0 - a
  canvas += a * material


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]):
  """Bilinearly interpolated Gaussian noise on a coarse grid, shape (h, w)."""
  grid = rng.standard_normal((cells[0] + 1, cells[1] + 1))
  ys = np.linspace(0.0, cells[0], h, endpoint=False)
  xs = np.linspace(0.0, cells[1], w, endpoint=False)
  y0, x0 = ys.astype(int), xs.astype(int)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of an (H, W, ...) array with edge padding."""
  radius = max(1, int(math.ceil(3.0 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  h, w = image.shape[:2]
  padded = np.pad(image, [(radius, radius), (0, 0)] + [(0, 0)] * (image.ndim - 2), mode="edge")
  image = sum(tap * padded[i:i + h] for i, tap in enumerate(taps))
  padded = np.pad(image, [(0, 0), (radius, radius)] + [(0, 0)] * (image.ndim - 2), mode="edge")
  return sum(tap * padded[:, i:i + w] for i, tap in enumerate(taps))


def _motion_blur(image: np.ndarray, length: float, angle: float) -> np.ndarray:
  """Averages shifted copies of an (H, W, C) image along direction `angle`."""
  taps = max(2, int(round(length)))
  steps = np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, taps)
  dys = np.round(steps * np.sin(angle)).astype(int)
  dxs = np.round(steps * np.cos(angle)).astype(int)
  pad = int(max(np.abs(dys).max(), np.abs(dxs).max()))
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  for dy, dx in zip(dys, dxs):
    out += padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w]
  return out / taps


# ----------------------------------------------------------------------------
# Scene composition.


# Backgrounds are rendered this many pixels larger on each side, then cropped
# at a per-sample shift (the camera shakes a little).
_BACKGROUND_MARGIN = 8


@functools.lru_cache(maxsize=64)
def _camera_background(config: RenderConfig, seed: int, camid: int) -> np.ndarray:
  """Camera `camid`'s background as a (H + 2m, W + 2m, 5) material map.

  Channels are RGB albedo, NI reflectance and TI temperature; m is
  _BACKGROUND_MARGIN. Cached: the background only depends on the camera.
  """
  camera = make_camera(config, seed, camid)
  m = _BACKGROUND_MARGIN
  h, w = config.height + 2 * m, config.width + 2 * m
  big_x = ((np.arange(w) + 0.5 - 0.5 * w) / config.height)[None, :].repeat(h, 0)
  big_y = ((0.5 * h - np.arange(h) - 0.5) / config.height)[:, None].repeat(w, 1)
  rng = np.random.default_rng(camera.texture_seed)
  coarse = _smooth_noise(rng, h, w, (6, 4))
  fine = rng.standard_normal((h, w))

  canvas = np.broadcast_to(camera.road_material, (h, w, 5)).copy()
  canvas[..., :4] *= (1.0 + 0.12 * coarse + 0.04 * fine)[..., None]
  for x0, slope in zip(camera.lane_x, camera.lane_slope):
    distance = np.abs(big_x - (x0 + slope * big_y)) - 0.012
    dashes = (np.sin(big_y * 25.0 + 3.0 * x0) > -0.3).astype(np.float64)
    _paint(canvas, _coverage(distance, 1.0 / config.height) * dashes, camera.lane_material)

  far = np.broadcast_to(camera.far_material, (h, w, 5)).copy()
  if camera.far_kind == 0:  # Window grid on the building.
    windows = ((np.sin(big_x * 60.0) > 0.3) & (np.sin(big_y * 50.0) > 0.2))
    far[windows] = camera.far_material * np.array([0.45, 0.5, 0.6, 0.5, 0.97])
  elif camera.far_kind == 1:  # Foliage clumps.
    far[..., :4] *= (1.0 + 0.3 * coarse + 0.1 * fine)[..., None]
  _paint(canvas, _coverage(camera.horizon - big_y, 1.0 / config.height), far)
  canvas.flags.writeable = False
  return canvas


def _vehicle_transform(config: RenderConfig, identity: Identity, camera: Camera,
                       rng: np.random.Generator):
  """Affine map vehicle coordinates -> image coordinates for one sample.

  Returns:
    (matrix (2, 2), translation (2,), centre_y): image = matrix @ [x, y - centre_y]
    + translation, image coordinates in image heights, origin at the centre.
  """
  length = _vehicle_length(identity)
  extent_x = identity.half_width + 0.1  # Mirrors stick out.
  aspect = config.width / config.height
  fit = min(0.94 * aspect / (2.0 * extent_x), 0.94 / (length + 0.1))
  p = config.pose_jitter
  zoom = fit * camera.zoom * (1.0 + rng.uniform(-0.05, 0.03) * p)
  angle = camera.rotation + np.deg2rad(rng.uniform(-2.0, 2.0) * p)
  shear = camera.shear + rng.uniform(-0.05, 0.05) * p
  tilt = camera.tilt * (1.0 + rng.uniform(-0.04, 0.04) * p)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  matrix = zoom * rotation @ np.array([[1.0, shear], [0.0, tilt]])
  if camera.mirrored:
    matrix = matrix @ np.diag([-1.0, 1.0])
  translation = np.array(camera.offset) + rng.uniform(-0.015, 0.015, size=2) * p
  return matrix, translation, 0.5 * (length - 0.1)


def _vehicle_length(identity: Identity) -> float:
  return (identity.front_height + identity.hood_length + identity.windshield_length +
          identity.roof_length + identity.cargo_length)


class _VehicleCanvas:
  """The (H, W, 5) canvas seen in vehicle coordinates.

  Each part is painted only inside the pixel window its bounding box maps to,
  which keeps small parts (lamps, plate, mirrors) cheap.
  """

  def __init__(self, canvas: np.ndarray, matrix: np.ndarray, translation: np.ndarray,
               centre_y: float):
    h, w = canvas.shape[:2]
    self.canvas = canvas
    self._matrix = matrix
    self._translation = translation
    self._centre_y = centre_y
    # Vehicle coordinates of every pixel centre (inverse of the affine map).
    big_x = (np.arange(w) + 0.5 - 0.5 * w) / h
    big_y = (0.5 * h - np.arange(h) - 0.5) / h
    inverse = np.linalg.inv(matrix)
    rel_x = big_x[None, :] - translation[0]
    rel_y = big_y[:, None] - translation[1]
    self.x = inverse[0, 0] * rel_x + inverse[0, 1] * rel_y
    self.y = inverse[1, 0] * rel_x + inverse[1, 1] * rel_y + centre_y
    # Pixel size in vehicle units, for anti-aliasing.
    self.px = 1.0 / (h * abs(np.linalg.det(matrix)) ** 0.5)
    self.vehicle = np.zeros((h, w))
    self.lamps = np.zeros((h, w))

  def to_image(self, points: np.ndarray) -> np.ndarray:
    """Maps (N, 2) vehicle points to image coordinates (image heights, Y up)."""
    return (points - [0.0, self._centre_y]) @ self._matrix.T + self._translation

  def window(self, x0: float, x1: float, y0: float, y1: float):
    """The (rows, cols) slices covering the vehicle-space box [x0, x1] x [y0, y1]."""
    h, w = self.canvas.shape[:2]
    (a, b), (c, d) = self._matrix
    tx, ty = self._translation
    cols, rows = [], []
    for vx in (x0, x1):
      for vy in (y0 - self._centre_y, y1 - self._centre_y):
        cols.append((a * vx + b * vy + tx) * h + 0.5 * w - 0.5)
        rows.append(0.5 * h - (c * vx + d * vy + ty) * h - 0.5)
    r0 = min(max(math.floor(min(rows)) - 2, 0), h)
    r1 = min(max(math.ceil(max(rows)) + 3, 0), h)
    c0 = min(max(math.floor(min(cols)) - 2, 0), w)
    c1 = min(max(math.ceil(max(cols)) + 3, 0), w)
    return slice(r0, r1), slice(c0, c1)

  def paint(self, bounds, coverage, material, vehicle: bool = True):
    """Composites a part.

    Args:
      bounds: (x0, x1, y0, y1), the part's bounding box in vehicle units.
      coverage: fn(x, y) -> [0, 1] coverage on the window's coordinates.
      material: (5,) material, or fn(x, y) -> (h, w, 5) for patterned parts.
      vehicle: whether the part counts towards the vehicle silhouette.

    Returns:
      (window slices, coverage on the window).
    """
    win = self.window(*bounds)
    x, y = self.x[win], self.y[win]
    alpha = coverage(x, y)
    _paint(self.canvas[win], alpha, material(x, y) if callable(material) else material)
    if vehicle:
      np.maximum(self.vehicle[win], alpha, out=self.vehicle[win])
    return win, alpha

  def box(self, cx, cy, hx, hy, material, radius=0.0, vehicle=True):
    px = self.px
    return self.paint((cx - hx, cx + hx, cy - hy, cy + hy),
                      lambda x, y: _box(x, y, cx, cy, hx, hy, px, radius), material, vehicle)


def _paint_vehicle(vc: _VehicleCanvas, identity: Identity) -> np.ndarray:
  """Paints the vehicle; fills vc.vehicle and vc.lamps (coverages).

  Returns:
    (2, 2) headlamp centres in vehicle coordinates.
  """
  i = identity
  px = vc.px
  hw = i.half_width
  y_hood = i.front_height
  y_ws = y_hood + i.hood_length
  y_roof = y_ws + i.windshield_length
  y_cab_end = y_roof + i.roof_length
  y_end = y_cab_end + i.cargo_length
  cabin_hw = hw * i.cabin_taper
  mid_top = 0.5 * (y_hood + y_cab_end)
  top_bounds = (-hw, hw, y_hood, y_cab_end)

  # Ground shadow first: it darkens the road (RGB, NI) under the vehicle.
  win = vc.window(-1.2 * hw, 1.2 * hw, -0.15, 0.2)
  shadow = _ellipse(vc.x[win], vc.y[win], 0.0, 0.02, hw * 1.15, 0.14, px)
  vc.canvas[win][..., :4] *= (1.0 - 0.55 * shadow)[..., None]
  if i.cargo_length > 0:
    cargo_cy = 0.5 * (y_cab_end - 0.05 + y_end)
    cargo_hy = 0.5 * (y_end - y_cab_end + 0.05)
    vc.box(0.0, cargo_cy, hw * 1.04, cargo_hy, i.cargo, 0.03)

    def cargo_box(x, y):
      return _box(x, y, 0.0, cargo_cy, hw * 1.04, cargo_hy, px, 0.03)

    if i.decal_kind == 3:  # Logo on the cargo box.
      cy = y_cab_end + 0.5 * i.cargo_length
      vc.paint((-hw, hw, cy - 0.15, cy + 0.15),
               lambda x, y: _ellipse(x, y, i.decal_pos, cy, 0.2, 0.14, px) * cargo_box(x, y),
               i.decal)
    elif i.decal_kind == 4:  # Band across the cargo box.
      cy = y_cab_end + 0.3 * i.cargo_length
      vc.box(0.0, cy, hw * 1.04, 0.06, i.decal)
  for side in (-1.0, 1.0):
    vc.box(side * (hw - 0.16), 0.015, 0.09, 0.085,
           _material([0.05, 0.05, 0.055], 0.08, 0.5 + i.wheel_heat), 0.03)
  # Front face in shade, hood and roof lit from above.
  vc.box(0.0, 0.5 * y_hood, hw, 0.5 * y_hood, i.body * np.array([0.8, 0.8, 0.8, 0.85, 1.0]),
         0.05)

  def hood(x, y):
    return _trapezoid(x, y, y_hood, y_ws + 0.01, hw, hw * 0.97, px)

  def cabin(x, y):
    return _trapezoid(x, y, y_ws, y_cab_end, hw * 0.96, cabin_hw, px)

  vc.paint((-hw, hw, y_hood, y_ws + 0.01), hood, i.body)
  vc.paint((-hw, hw, y_ws, y_cab_end), cabin, i.body)
  vc.paint((-cabin_hw, cabin_hw, y_roof, y_cab_end),
           lambda x, y: _trapezoid(x, y, y_roof, y_cab_end, cabin_hw * 0.98, cabin_hw, px),
           i.roof)

  def on_top(part):
    return lambda x, y: part(x, y) * np.maximum(hood(x, y), cabin(x, y))

  if i.decal_kind == 1:
    vc.paint(top_bounds, on_top(lambda x, y: np.maximum(
        _box(x, y, -0.08, mid_top, 0.035, 2.0, px),
        _box(x, y, 0.08, mid_top, 0.035, 2.0, px))), i.decal)
  elif i.decal_kind == 2:
    vc.paint(top_bounds, on_top(lambda x, y: _box(x, y, i.decal_pos, mid_top, 0.06, 2.0, px)),
             i.decal)
  elif i.decal_kind == 3 and i.cargo_length == 0:
    cy = 0.5 * (y_hood + y_ws)
    vc.paint((-hw, hw, y_hood, y_ws),
             lambda x, y: _ellipse(x, y, i.decal_pos, cy, 0.09, 0.07, px) * hood(x, y),
             i.decal)
  elif i.decal_kind == 4:
    vc.box(0.0, 0.86 * y_hood, hw, 0.035, i.decal)

  # Windshield: glass reflects the sky (brighter towards the top in RGB), is
  # dark in NI and cold in TI.
  def glass(x, y):
    sky = np.clip((y - y_ws) / max(i.windshield_length, 1e-3), 0.0, 1.0)[..., None]
    return (_material([0.1, 0.12, 0.16], 0.07, 0.22) +
            sky * np.array([0.12, 0.13, 0.14, 0.03, 0.0]))

  vc.paint((-hw, hw, y_ws, y_roof),
           lambda x, y: _trapezoid(x, y, y_ws + 0.03, y_roof - 0.02, hw * 0.88,
                                   cabin_hw * 0.88, px), glass)
  if i.sunroof:
    vc.box(0.0, y_roof + 0.45 * i.roof_length, cabin_hw * 0.55, 0.2 * i.roof_length,
           _material([0.08, 0.09, 0.11], 0.07, 0.25), 0.02)
  if i.roof_rack:
    for t in (0.3, 0.75):
      vc.box(0.0, y_roof + t * i.roof_length, cabin_hw * 0.95, 0.015,
             _material([0.15, 0.15, 0.15], 0.2, 0.45))
  for side in (-1.0, 1.0):  # Side mirrors.
    vc.box(side * (hw + 0.05), y_ws + 0.06, 0.05, 0.035, i.body, 0.015)
  vc.box(0.0, 0.05, hw, 0.05, i.bumper, 0.03)
  # Grille with horizontal slats.
  gh = i.grille_size[1] * y_hood
  gy = 0.12 + 0.5 * gh

  def slatted(x, y):
    slats = np.sin((y - gy) * np.pi * i.grille_slats / max(gh, 1e-3)) > 0.0
    return np.where(slats[..., None], i.grille, i.grille * np.array([0.4, 0.4, 0.4, 0.5, 1.0]))

  vc.box(0.0, gy, i.grille_size[0] * hw, 0.5 * gh, slatted, 0.02)
  # Headlamps (their coverage is kept: they glow at night).
  lamp_x, lamp_y = i.lamp_pos[0] * hw, i.lamp_pos[1] * y_hood
  lw, lh = i.lamp_size
  lamp_material = _material([0.82, 0.82, 0.78], 0.7, 0.55)
  for side in (-1.0, 1.0):
    cx = side * lamp_x
    if i.lamp_kind == 0:
      shape = lambda x, y, cx=cx: _ellipse(x, y, cx, lamp_y, lw * 0.8, lh, px)
    elif i.lamp_kind == 1:
      shape = lambda x, y, cx=cx: _box(x, y, cx, lamp_y, lw, lh, px, 0.01)
    else:
      shape = lambda x, y, cx=cx: _box(x, y, cx, lamp_y, lw * 1.2, lh * 0.45, px, 0.01)
    win, alpha = vc.paint((cx - 1.2 * lw, cx + 1.2 * lw, lamp_y - lh, lamp_y + lh),
                          shape, lamp_material)
    np.maximum(vc.lamps[win], alpha, out=vc.lamps[win])
  # Licence plate: bright (retroreflective in NI) with a per-identity glyph
  # pattern of 2 rows x 10 columns.
  plate_cx, plate_cy, plate_hx, plate_hy = i.plate_x, 0.075, 0.16, 0.04
  paper = _material([0.88, 0.78, 0.2] if i.plate_yellow else [0.86, 0.86, 0.86], 0.88, 0.5)
  ink_material = _material([0.08, 0.08, 0.1], 0.15, 0.5)

  def printed(x, y):
    col = np.clip(((x - plate_cx + plate_hx * 0.9) / (1.8 * plate_hx) * 10).astype(int), 0, 9)
    row = (y < plate_cy).astype(int)
    ink = (i.plate_bits[row, col] & (np.abs(x - plate_cx) < plate_hx * 0.9) &
           (np.abs(y - plate_cy) < plate_hy * 0.75))
    return np.where(ink[..., None], ink_material, paper)

  vc.box(plate_cx, plate_cy, plate_hx, plate_hy, printed)
  return np.array([[-lamp_x, lamp_y], [lamp_x, lamp_y]])


def _flare_layer(rng: np.random.Generator, kind: str, big_x: np.ndarray,
                 big_y: np.ndarray, lamps: np.ndarray, strength: float) -> np.ndarray:
  """Additive flare intensity (H, W) in [0, 1] units (saturates above ~1).

  Args:
    rng: the sample's random stream.
    kind: "headlamp" or "sun".
    big_x, big_y: image coordinates (image heights, Y up) of every pixel.
    lamps: (2, 2) headlamp centres in image coordinates.
    strength: overall intensity multiplier.
  """
  layer = np.zeros_like(big_x)
  if kind == "headlamp":
    core = rng.uniform(0.06, 0.1)
    halo = rng.uniform(0.08, 0.13)
    streak_len = rng.uniform(0.15, 0.35)
    streak_width = rng.uniform(0.004, 0.009)
    n_streaks = int(rng.integers(2, 5))
    phase = rng.uniform(0.0, np.pi)
    for cx, cy in lamps:
      dx, dy = big_x - cx, big_y - cy
      r = np.hypot(dx, dy)
      layer += 2.0 * np.exp(-(r / core) ** 2) + 0.9 * np.exp(-r / halo)
      for k in range(n_streaks):
        phi = phase + np.pi * k / n_streaks
        along = np.abs(dx * np.cos(phi) + dy * np.sin(phi))
        across = np.abs(-dx * np.sin(phi) + dy * np.cos(phi))
        layer += 0.8 * np.exp(-(across / streak_width) ** 2) * np.exp(-along / streak_len)
  else:
    cx = rng.uniform(-0.3, 0.3)
    cy = rng.uniform(0.3, 0.6)
    radius = rng.uniform(0.22, 0.32)
    dx, dy = big_x - cx, big_y - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    rays = (0.5 + 0.5 * np.cos(int(rng.integers(6, 13)) * phi + rng.uniform(0, np.pi))) ** 4
    layer += 1.6 * np.exp(-(r / radius) ** 2) + 0.7 * rays * np.exp(-r / (1.5 * radius))
    layer += rng.uniform(0.05, 0.2)  # Veiling glare lifts the whole frame.
    # Ghost discs along the line from the sun through the image centre.
    for t in rng.uniform(0.6, 1.8, size=int(rng.integers(1, 4))):
      ghost = np.hypot(big_x + t * cx, big_y + t * cy) - rng.uniform(0.02, 0.06)
      layer += 0.25 * _coverage(ghost, 0.01)
  return strength * layer


@functools.lru_cache(maxsize=8)
def _image_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Image coordinates (X, Y) of every pixel centre, (h, w) each.

  Units are image heights, Y points up, the origin is the image centre.
  """
  big_x = ((np.arange(w) + 0.5 - 0.5 * w) / h)[None, :].repeat(h, 0)
  big_y = ((0.5 * h - np.arange(h) - 0.5) / h)[:, None].repeat(w, 1)
  big_x.flags.writeable = False
  big_y.flags.writeable = False
  return big_x, big_y


def render_sample(config: RenderConfig, seed: int, pid: int, camid: int,
                  index: int) -> Sample:
  """Renders sample `index` of vehicle `pid` seen by camera `camid`.

  Args:
    config: renderer configuration.
    seed: dataset seed.
    pid: vehicle id (>= 0).
    camid: camera index in [0, config.num_cameras).
    index: sample index within (pid, camid), >= 0.

  Returns:
    The Sample; identical for identical arguments.
  """
  if not 0 <= camid < config.num_cameras:
    raise ValueError(f"camid must be in [0, {config.num_cameras}), got {camid}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  h, w = config.height, config.width
  camera = make_camera(config, seed, camid)
  identity = make_identity(config, seed, pid)
  # Independent streams for the conditions, the scene (pose, lighting, blur),
  # the flare and the noise: changing one knob (say flare_prob) leaves the
  # other aspects of every sample unchanged.
  streams = np.random.SeedSequence([seed, _TAG_SAMPLE, pid, camid, index]).spawn(4)
  u_night, u_flare, u_sun, u_blur = np.random.default_rng(streams[0]).random(4)
  scene_rng, flare_rng, noise_rng = (np.random.default_rng(s) for s in streams[1:])
  night = bool(u_night < config.night_prob)
  flare = "none"
  if u_flare < config.flare_prob:
    flare = "sun" if (not night and u_sun < config.sun_flare_share) else "headlamp"
  blurred = bool(u_blur < config.blur_prob)

  big_x, big_y = _image_grid(h, w)
  r0, c0 = scene_rng.integers(0, 2 * _BACKGROUND_MARGIN + 1, size=2)
  canvas = _camera_background(config, seed, camid)[r0:r0 + h, c0:c0 + w].copy()

  matrix, translation, centre_y = _vehicle_transform(config, identity, camera, scene_rng)
  vc = _VehicleCanvas(canvas, matrix, translation, centre_y)
  lamp_centres = _paint_vehicle(vc, identity)
  x, y, vehicle, lamps = vc.x, vc.y, vc.vehicle, vc.lamps

  # TI: heat sources on the vehicle; exhaust gas below it, then a strong blur
  # (thermal cameras are low-resolution and heat diffuses).
  length = _vehicle_length(identity)
  ex, ey = identity.engine_pos
  engine = np.exp(-(np.hypot(x - ex * identity.half_width, y - ey * length)
                    / identity.engine_radius) ** 2)
  heat = identity.engine_heat * scene_rng.uniform(0.8, 1.1)
  thermal = canvas[..., 4] + heat * engine * vehicle
  if identity.exhaust_side:
    exhaust = np.exp(-(np.hypot(x - identity.exhaust_side * identity.half_width * 0.7,
                                y + 0.02) / 0.09) ** 2)
    thermal = thermal + 0.25 * exhaust
  thermal = _gaussian_blur(thermal + scene_rng.uniform(-0.03, 0.03), 0.025 * h)

  # Illumination.
  rgb = canvas[..., :3] * camera.white_balance
  ni = canvas[..., 3]
  if night:
    # Street lighting: dim and orange; lit headlamps glow.
    rgb = rgb * scene_rng.uniform(0.15, 0.3) * np.array([1.0, 0.85, 0.6])
    rgb = rgb + (0.92 - rgb) * lamps[..., None]
    # Active NIR illuminator: nearly daytime levels, falling off off-axis.
    falloff = 1.0 - 0.8 * (big_x**2 + big_y**2)
    ni = ni * scene_rng.uniform(0.65, 0.85) * falloff
  else:
    rgb = rgb * scene_rng.uniform(0.8, 1.02)
    ni = ni * scene_rng.uniform(0.8, 1.02)
  images = np.concatenate([rgb, ni[..., None], thermal[..., None]], axis=-1)
  if blurred:
    images = _motion_blur(images, scene_rng.uniform(0.03, 0.08) * h,
                          np.pi / 2 + scene_rng.uniform(-0.5, 0.5))
  rgb, ni, thermal = images[..., :3], images[..., 3], images[..., 4]

  # Flare: added to RGB and NI only, with a per-modality gain.
  flare_rgb = np.zeros((h, w, 3))
  flare_ni = np.zeros((h, w))
  if flare != "none":
    lamp_image = vc.to_image(lamp_centres)
    layer = _flare_layer(flare_rng, flare, big_x, big_y, lamp_image,
                         config.flare_strength * flare_rng.uniform(0.7, 1.6))
    tint = np.array([1.0, 0.97, 0.9]) if flare == "headlamp" else np.array([1.0, 0.95, 0.82])
    gains = flare_rng.uniform(0.7, 1.3, size=2)
    if flare_rng.random() < 0.1:  # Sometimes only one modality is hit hard.
      gains[int(flare_rng.integers(0, 2))] *= 0.25
    flare_rgb = layer[..., None] * tint * gains[0]
    flare_ni = layer * gains[1]
    rgb = rgb + flare_rgb
    ni = ni + flare_ni

  noise = config.noise_std
  noise_maps = noise_rng.standard_normal((5, h, w), dtype=np.float32)
  rgb = rgb + noise * (3.0 if night else 1.0) * np.moveaxis(noise_maps[:3], 0, -1)
  ni = ni + noise * (1.5 if night else 1.0) * noise_maps[3]
  thermal = thermal + noise * 0.5 * noise_maps[4]

  def to_uint8(image: np.ndarray, top: int = 255) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, top).astype(np.uint8)

  rgb8 = to_uint8(rgb)
  ni8 = np.repeat(to_uint8(ni)[..., None], 3, axis=-1)
  ti8 = np.repeat(to_uint8(thermal, TI_MAX_VALUE)[..., None], 3, axis=-1)
  low = features.FLARE_PIXEL_LOW
  # Channel maxima by hand (numpy reductions over a last axis of 3 are slow);
  # the flare's red channel is its largest (tint 1.0).
  rgb8_max = np.maximum(np.maximum(rgb8[..., 0], rgb8[..., 1]), rgb8[..., 2])
  mask_rgb = (rgb8_max >= low) & (flare_rgb[..., 0] >= _MASK_MIN_FLARE)
  mask_ni = (ni8[..., 0] >= low) & (flare_ni >= _MASK_MIN_FLARE)
  return Sample(
      rgb=rgb8, ni=ni8, ti=ti8,
      flare_mask_rgb=mask_rgb[..., None].astype(np.uint8),
      flare_mask_ni=mask_ni[..., None].astype(np.uint8),
      vehicle_mask=vehicle > 0.5,
      night=night, flare=flare, blurred=blurred)
