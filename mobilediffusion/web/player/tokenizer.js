// Prompt -> token ids with @huggingface/tokenizers reading the bundle's tokenizer.json, as runtime/tokenizer.py
// does with `tokenizers`: chunks of max_length ids with emphasis weights (prompt.js), at most the bundle's
// max_chunks.
import { Tokenizer } from "@huggingface/tokenizers";

import { emptyChunk, weightedChunks } from "./prompt.js";

export class BundleTokenizer {
  /** json: tokenizer.json parsed; config: tokenizer_config.json parsed (or {}); spec: the manifest's tokenizer. */
  constructor(json, config, spec) {
    this.tokenizer = new Tokenizer(json, config);
    this.maxLength = spec.max_length;
    this.maxChunks = spec.max_chunks ?? 1; // bundles from before long prompts take one chunk
    this.special = { bos: spec.bos_token_id, eos: spec.eos_token_id, pad: spec.pad_token_id, maxLength: this.maxLength };
  }

  segment(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** One prompt -> {ids, weights, k, cut} (prompt.js weightedChunks) at most maxChunks chunks. */
  chunks(prompt, warn = () => {}) {
    return weightedChunks(prompt, (t) => this.segment(t), { ...this.special, maxChunks: this.maxChunks }, warn);
  }

  /** The empty prompt's ids (max_length): what emphasis weights are measured from. */
  empty() {
    return emptyChunk(this.special);
  }
}
