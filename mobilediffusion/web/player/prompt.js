// Prompts as ComfyUI's CLIPTextEncode reads them, as mobilediffusion/prompts.py does in Python (the same rules,
// tested against it in Node): `(text)` x1.1, `(text:1.5)`, `\(` `\)` literal; each weighted segment tokenized
// alone; chunks of maxLength ids (BOS, up to maxLength - 2 tokens, EOS, padding), a segment of fewer than
// MAX_WORD_LENGTH tokens moved whole to the next chunk rather than split; `embedding:NAME` left out.

export const MAX_WORD_LENGTH = 8;
const EMBEDDING = "embedding:";
const ESCAPES = [["\\)", "\u0000\u0001"], ["\\(", "\u0000\u0002"]];

/** Python's float() of a string, or null where Python raises ValueError. */
export function pythonFloat(text) {
  const t = text.trim().replace(/(?<=\d)_(?=\d)/g, "");
  if (/^[+-]?(inf|infinity)$/i.test(t)) return t.startsWith("-") ? -Infinity : Infinity;
  if (/^[+-]?nan$/i.test(t)) return NaN;
  return /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(t) ? Number(t) : null;
}

function parentheses(text) {
  const out = [];
  let current = "", depth = 0;
  for (const ch of text) {
    if (ch === "(") {
      if (depth === 0) {
        if (current) out.push(current);
        current = "(";
      } else {
        current += ch;
      }
      depth += 1;
    } else if (ch === ")") {
      depth -= 1;
      if (depth === 0) {
        out.push(current + ")");
        current = "";
      } else {
        current += ch;
      }
    } else {
      current += ch;
    }
  }
  if (current) out.push(current);
  return out;
}

function tokenWeights(text, weight) {
  const out = [];
  for (const piece of parentheses(text)) {
    if (piece.length >= 2 && piece[0] === "(" && piece[piece.length - 1] === ")") {
      let inner = piece.slice(1, -1), innerWeight = weight * 1.1;
      const colon = inner.lastIndexOf(":");
      if (colon > 0) {
        const value = pythonFloat(inner.slice(colon + 1));
        if (value !== null) {
          innerWeight = value;
          inner = inner.slice(0, colon);
        }
      }
      out.push(...tokenWeights(inner, innerWeight));
    } else {
      out.push([piece, weight]);
    }
  }
  return out;
}

/** The prompt as [segment, weight] pairs, parentheses resolved. */
export function parseWeights(text) {
  for (const [literal, code] of ESCAPES) text = text.split(literal).join(code);
  const unescape = (s) => ESCAPES.reduce((t, [literal, code]) => t.split(code).join(literal[1]), s);
  return tokenWeights(text, 1.0).map(([segment, weight]) => [unescape(segment), weight]);
}

function words(segment, warn) {
  const parts = segment.split(/ embedding:|\nembedding:/);
  const out = [];
  for (let word of [parts[0], ...parts.slice(1).map((p) => EMBEDDING + p)].filter((w) => w !== "")) {
    if (word.startsWith(EMBEDDING)) {
      const split = word.slice(EMBEDDING.length).replace(/^\n+|\n+$/g, "").split(/\s+/).filter((w) => w);
      const name = split[0] ?? "";
      let leftover = split.slice(1).join(" ");
      const stripped = name.replace(/^,+|,+$/g, "");
      if (stripped.length < name.length) leftover = `${name.slice(stripped.length)} ${leftover}`;
      warn(`textual-inversion embeddings are not supported: ${EMBEDDING}${name} was left out of the prompt`);
      if (leftover === "") continue;
      word = leftover;
    }
    out.push(word);
  }
  return out;
}

/** [[id, weight], ...] per word; tokenize(text) -> ids without BOS/EOS. */
export function tokenGroups(text, tokenize, warn = () => {}) {
  const groups = [];
  for (const [segment, weight] of parseWeights(text)) {
    for (const word of words(segment, warn)) groups.push(tokenize(word).map((t) => [t, weight]));
  }
  return groups;
}

/** The token groups in chunks of maxLength [id, weight] pairs (ComfyUI's batching). */
export function chunk(groups, { bos, eos, pad, maxLength }) {
  let current = [[bos, 1.0]];
  const chunks = [current];
  for (let group of groups) {
    const large = group.length >= MAX_WORD_LENGTH;
    while (group.length) {
      if (group.length + current.length > maxLength - 1) {
        const room = maxLength - current.length - 1;
        if (large) {
          current.push(...group.slice(0, room), [eos, 1.0]);
          group = group.slice(room);
        } else {
          current.push([eos, 1.0], ...Array.from({ length: room }, () => [pad, 1.0]));
        }
        current = [[bos, 1.0]];
        chunks.push(current);
      } else {
        current.push(...group);
        group = [];
      }
    }
  }
  current.push([eos, 1.0]);
  while (current.length < maxLength) current.push([pad, 1.0]);
  return chunks;
}

/**
 * Prompt -> {ids: Int32Array (k * maxLength), weights: Float32Array (same), k, cut}: at most maxChunks chunks
 * (`cut`: how many more the prompt had, which are left out).
 */
export function weightedChunks(text, tokenize, { bos, eos, pad, maxLength, maxChunks = Infinity }, warn = () => {}) {
  let chunks = chunk(tokenGroups(text, tokenize, warn), { bos, eos, pad, maxLength });
  const cut = Math.max(0, chunks.length - maxChunks);
  if (cut) chunks = chunks.slice(0, maxChunks);
  const flat = chunks.flat();
  return { ids: Int32Array.from(flat, ([t]) => t), weights: Float32Array.from(flat, ([, w]) => w),
    k: chunks.length, cut };
}

/** The empty prompt weights are measured from: BOS, EOS, padding. */
export function emptyChunk({ bos, eos, pad, maxLength }) {
  const out = new Int32Array(maxLength).fill(pad);
  out[0] = bos;
  out[1] = eos;
  return out;
}
