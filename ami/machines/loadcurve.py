"""Synthetic load curves: a pure function of (meter seed, interval number).

A meter never stores its load curve.  Any point of it is recomputed from the
meter's seed and the interval number ``k``, so after a fleet crash the meter
can still answer a gap-fill for any of its last ``history`` intervals, and two
runs of the same fleet produce the same data (the head-end's "stored exactly
once" is then testable byte for byte).

Energy index at the end of interval ``k`` (``t = (k + 1) * interval_s``)::

    E(k) = e0 + base * k + floor(day_wh * S(t)) + h(k)

* ``base * k``: standby consumption, ``base >= 1`` Wh per interval;
* ``S(t)``: the integral, in days, of a daily shape
  ``s(x) = 1 + a1 cos 2pi(x - p1) + a2 cos 4pi(x - p2)`` (x = time of day in
  days) with a morning and a higher evening peak and a night trough.  Its
  closed form is a sum of sines; ``a1 + a2 <= 0.85`` keeps ``s >= 0.15 > 0``,
  so ``S`` is strictly increasing and ``floor(day_wh * S)`` never decreases;
* ``h(k)``: hash noise in ``[0, noise)`` with ``1 <= noise <= base``.

Hence ``E(k) - E(k-1) >= base + 0 + h(k) - h(k-1) >= base - (noise - 1) >= 1``:
the index is strictly increasing for every k (tests/test_meters.py checks it
with hypothesis).  Interval average power is ``(E(k) - E(k-1)) * 3600 /
interval_s`` W; voltage is 230 V with a small daily swing and hash noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ami.protocol.messages import Reading

_MASK = (1 << 64) - 1
_DAY = 86400
_TAU = 2.0 * math.pi
_TAU2 = 2.0 * _TAU
_sin = math.sin


def mix64(x: int) -> int:
    """SplitMix64's finaliser: a fast, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def unit(h: int) -> float:
    """A 64-bit hash as a float in [0, 1)."""
    return (h >> 11) * (1.0 / (1 << 53))


def seed_for(system_title: bytes) -> int:
    """The load-curve seed of a meter: its system title, hashed (stable across runs)."""
    return mix64(int.from_bytes(system_title, "big"))


@dataclass(frozen=True, slots=True)
class Profile:
    """The constants of one meter's curve, all derived from its seed."""

    seed: int
    interval_s: int
    e0: int  # Wh, index at "k = 0"
    base: int  # Wh per interval of standby load
    noise: int  # noise bound, 1 <= noise <= base (the monotonicity proof needs it)
    day_wh: int  # Wh per day of shaped (occupancy) load
    a1: float  # daily harmonic (evening > morning, night trough)
    p1: float
    a2: float  # twice-daily harmonic (the two peaks)
    p2: float
    # Terms of shape_integral that depend on the meter only, computed once
    # (every reading needs two points of S): the same expressions, so the
    # same floats, as computing them on each call.
    _c1: float = field(init=False, repr=False, compare=False)
    _c2: float = field(init=False, repr=False, compare=False)
    _s1: float = field(init=False, repr=False, compare=False)
    _s2: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        init = object.__setattr__  # frozen: set the derived slots once, here
        init(self, "_c1", self.a1 / _TAU)
        init(self, "_c2", self.a2 / (2.0 * _TAU))
        init(self, "_s1", math.sin(-_TAU * self.p1))
        init(self, "_s2", math.sin(-2.0 * _TAU * self.p2))

    def shape_integral(self, t: int) -> float:
        """S(t): integral of the daily shape from 0 to t seconds, in days."""
        days, rest = divmod(t, _DAY)
        x = rest / _DAY
        part = (
            x
            + self._c1 * (_sin(_TAU * (x - self.p1)) - self._s1)
            + self._c2 * (_sin(_TAU2 * (x - self.p2)) - self._s2)
        )
        # Rounding can push S(1-) a hair above 1; never above the next midnight.
        return days + min(part, 1.0)


def profile(seed: int, interval_s: int) -> Profile:
    if interval_s < 1:
        raise ValueError("interval_s must be at least one second")
    h = [mix64(seed ^ (salt * 0xA24BAED4963EE407)) for salt in range(1, 8)]
    standby_w = 80 + h[0] % 200  # 80..279 W
    base = max(1, standby_w * interval_s // 3600)
    return Profile(
        seed=seed,
        interval_s=interval_s,
        e0=h[1] % 20_000_000,  # up to 20 MWh on the index at the origin
        base=base,
        noise=max(1, base // 2),
        day_wh=5000 + h[2] % 10_000,  # 5..15 kWh a day of occupancy load
        a1=0.20 + 0.15 * unit(h[3]),  # <= 0.35
        p1=(18.0 + 2.0 * unit(h[4])) / 24.0,  # evening maximum around 18-20 h
        a2=0.30 + 0.20 * unit(h[5]),  # <= 0.50
        p2=(7.0 + 1.5 * unit(h[6])) / 24.0,  # peaks near 7-8.5 h and 19-20.5 h
    )


# Terms that depend on the interval (or time) only, the same for every meter:
# a fleet pushes the same k, at the same ts, for thousands of meters in a row,
# so these small memos turn two of the four 64-bit hashes of a reading and
# its cosine into dictionary hits.  Pure functions of their argument, so the
# memos are invisible (and bounded: emptied when full).
_MEMO_MAX = 1024
_k_terms: dict[int, int] = {}
_t_terms: dict[int, tuple[int, int]] = {}


def _mix_k(k: int) -> int:
    value = _k_terms.get(k)
    if value is None:
        if len(_k_terms) >= _MEMO_MAX:
            _k_terms.clear()
        value = _k_terms[k] = mix64(k & _MASK)
    return value


def _time_terms(t: int) -> tuple[int, int]:
    """(daily voltage swing, hash of t) for voltage_dv."""
    terms = _t_terms.get(t)
    if terms is None:
        if len(_t_terms) >= _MEMO_MAX:
            _t_terms.clear()
        x = (t % _DAY) / _DAY
        terms = _t_terms[t] = (round(12.0 * math.cos(_TAU * (x - 0.15))), mix64(t & _MASK))
    return terms


def _noise(p: Profile, k: int) -> int:
    return mix64(p.seed ^ _mix_k(k)) % p.noise


def energy_wh(p: Profile, k: int) -> int:
    """Index (Wh) at the end of interval k.  Strictly increasing in k (k >= -1)."""
    t = (k + 1) * p.interval_s
    return p.e0 + p.base * k + math.floor(p.day_wh * p.shape_integral(t)) + _noise(p, k)


def voltage_dv(p: Profile, t: int) -> int:
    """Decivolts around 2300: +-12 daily swing (low at the evening peak) +-28 noise."""
    swing, mixed_t = _time_terms(t)
    noise = int(mix64(p.seed ^ 0x5EED ^ mixed_t) % 57) - 28
    return 2300 + swing + noise


def point(p: Profile, k: int, prev_energy: int | None = None) -> tuple[int, int, int, int, int]:
    """The fields of ``reading(p, k)``: (seq, ts, energy_wh, power_w, voltage_dv).

    ``prev_energy``: ``energy_wh(p, k - 1)`` when the caller already has it
    (the previous reading's index): it saves half the work."""
    e = energy_wh(p, k)
    e_prev = energy_wh(p, k - 1) if prev_energy is None else prev_energy
    ts = (k + 1) * p.interval_s
    return k, ts, e, (e - e_prev) * 3600 // p.interval_s, voltage_dv(p, ts)


def reading(p: Profile, k: int, sealed_ns: int | None = None, *, prev_energy: int | None = None) -> Reading:
    """The load-curve point of interval k (regenerable at any time)."""
    seq, ts, e, power, voltage = point(p, k, prev_energy)
    return Reading(seq=seq, ts=ts, energy_wh=e, power_w=power, voltage_dv=voltage, sealed_ns=sealed_ns)


def readings(p: Profile, first: int, last: int) -> list[Reading]:
    """``[reading(p, k) for k in range(first, last + 1)]``, each index computed once."""
    out: list[Reading] = []
    prev = energy_wh(p, first - 1) if first <= last else 0
    for k in range(first, last + 1):
        r = reading(p, k, prev_energy=prev)
        prev = r.energy_wh
        out.append(r)
    return out


def instant(p: Profile, now: float) -> Reading:
    """Instantaneous values for a ReadReply: the index part-way through the
    current interval (linear within it), that interval's power, voltage now.
    ``seq`` is the current, unfinished interval; it is not a load-curve point."""
    t = int(now)
    k = t // p.interval_s
    e_start = energy_wh(p, k - 1)
    e_end = energy_wh(p, k)
    frac = (t - k * p.interval_s) / p.interval_s
    e = e_start + math.floor((e_end - e_start) * frac)
    power = (e_end - e_start) * 3600 // p.interval_s
    return Reading(seq=k, ts=t, energy_wh=e, power_w=power, voltage_dv=voltage_dv(p, t))
