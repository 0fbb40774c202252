// The bundle's noise, bit for bit: numpy.random.default_rng(seed).standard_normal(shape, dtype=float32).
//
// default_rng(seed) seeds PCG64 (128-bit LCG, XSL-RR output) through numpy's SeedSequence hash;
// standard_normal(float32) is the float Ziggurat on 32-bit draws (two per 64-bit output). The tables
// come from the published Ziggurat construction (256 boxes, r = 3.6541528853610088,
// v = 0.00492867323399), built once below. tests/test_web_player.py checks the stream against numpy.

const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
const PCG_MULT = (2549297995355413924n << 64n) + 4865540595714422341n;

// --------------------------------------------------------------------------- SeedSequence (pool of 4 words)
const INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715, POOL = 4;

function seedWords(seed) {
  // a non-negative integer as little-endian uint32 words ([0] for 0)
  let n = BigInt(seed);
  if (n < 0n) throw new Error(`the seed must be a non-negative integer, got ${seed}`);
  const words = [];
  do {
    words.push(Number(n & 0xffffffffn));
    n >>= 32n;
  } while (n > 0n);
  return words;
}

function seedSequenceState(seed, nWords) {
  const entropy = seedWords(seed);
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = Math.imul(hashConst, MULT_A) >>> 0;
    value = Math.imul(value, hashConst) >>> 0;
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (Math.imul(MIX_MULT_L, x) - Math.imul(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = new Array(POOL);
  for (let i = 0; i < POOL; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let src = 0; src < POOL; src++) {
    for (let dst = 0; dst < POOL; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (let src = POOL; src < entropy.length; src++) {
    for (let dst = 0; dst < POOL; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  // generate_state: nWords uint32 words cycling over the pool
  let h = INIT_B;
  const out = new Array(nWords);
  for (let i = 0; i < nWords; i++) {
    let v = (pool[i % POOL] ^ h) >>> 0;
    h = Math.imul(h, MULT_B) >>> 0;
    v = Math.imul(v, h) >>> 0;
    out[i] = (v ^ (v >>> 16)) >>> 0;
  }
  return out;
}

// --------------------------------------------------------------------------- PCG64
export class PCG64 {
  constructor(seed) {
    const w = seedSequenceState(seed, 8); // 4 uint64 = (lo, hi) word pairs
    const u64 = (k) => (BigInt(w[2 * k + 1]) << 32n) | BigInt(w[2 * k]);
    const initState = (u64(0) << 64n) | u64(1);
    const initSeq = (u64(2) << 64n) | u64(3);
    this.inc = ((initSeq << 1n) | 1n) & MASK128;
    this.state = 0n;
    this.step();
    this.state = (this.state + initState) & MASK128;
    this.step();
    this.spare = null; // the high half of the last 64-bit output, not yet used
  }

  step() {
    this.state = (this.state * PCG_MULT + this.inc) & MASK128;
  }

  next64() {
    this.step();
    const s = this.state;
    const x = ((s >> 64n) ^ s) & MASK64;
    const rot = s >> 122n;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & MASK64;
  }

  next32() {
    if (this.spare !== null) {
      const v = this.spare;
      this.spare = null;
      return v;
    }
    const v = this.next64();
    this.spare = Number(v >> 32n);
    return Number(v & 0xffffffffn);
  }

  nextFloat() {
    return Math.fround((this.next32() >>> 8) * (1.0 / 16777216.0));
  }
}

// --------------------------------------------------------------------------- float Ziggurat tables
const ZIG_R = 3.6541528853610088;
const ZIG_V = 0.00492867323399;
const R_F = Math.fround(ZIG_R);
const INV_R_F = Math.fround(1 / ZIG_R);

function zigguratTables() {
  const m = 2 ** 23; // rabs has 23 bits
  const ki = new Uint32Array(256), wi = new Float32Array(256), fi = new Float32Array(256);
  let dn = ZIG_R, tn = dn;
  const q = ZIG_V / Math.exp(-0.5 * dn * dn);
  ki[0] = Math.floor((dn / q) * m);
  ki[1] = 0;
  wi[0] = q / m;
  wi[255] = dn / m;
  fi[0] = 1.0;
  fi[255] = Math.exp(-0.5 * dn * dn);
  for (let i = 254; i >= 1; i--) {
    dn = Math.sqrt(-2 * Math.log(ZIG_V / dn + Math.exp(-0.5 * dn * dn)));
    ki[i + 1] = Math.floor((dn / tn) * m);
    tn = dn;
    fi[i] = Math.exp(-0.5 * dn * dn);
    wi[i] = dn / m;
  }
  return { ki, wi, fi };
}

const { ki: KI, wi: WI, fi: FI } = zigguratTables();

function standardNormal(rng) {
  for (;;) {
    const r = rng.next32();
    const idx = r & 0xff;
    const sign = (r >>> 8) & 1;
    const rabs = (r >>> 9) & 0x7fffff;
    let x = Math.fround(rabs * WI[idx]);
    if (sign) x = -x;
    if (rabs < KI[idx]) return x;
    if (idx === 0) {
      for (;;) {
        const xx = Math.fround(-INV_R_F * Math.fround(Math.log1p(-rng.nextFloat())));
        const yy = Math.fround(-Math.fround(Math.log1p(-rng.nextFloat())));
        if (Math.fround(yy + yy) > Math.fround(xx * xx)) {
          return (rabs >>> 8) & 1 ? -Math.fround(R_F + xx) : Math.fround(R_F + xx);
        }
      }
    } else if (Math.fround(Math.fround((FI[idx - 1] - FI[idx]) * rng.nextFloat()) + FI[idx]) < Math.exp(-0.5 * x * x)) {
      return x;
    }
  }
}

/** numpyNoise(seed)(shape) -> Float32Array: the draws numpy_noise(seed) makes, in call order. */
export function numpyNoise(seed) {
  const rng = new PCG64(seed);
  return (shape) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = standardNormal(rng);
    return out;
  };
}
