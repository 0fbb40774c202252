// Prompt -> token ids with @huggingface/tokenizers reading the bundle's tokenizer.json, as
// runtime/tokenizer.py does with `tokenizers`: BOS, the prompt's tokens (cut to max_length - 2), EOS, padding.
import { Tokenizer } from "@huggingface/tokenizers";

export class BundleTokenizer {
  /** json: tokenizer.json parsed; config: tokenizer_config.json parsed (or {}); spec: the manifest's tokenizer. */
  constructor(json, config, spec) {
    this.tokenizer = new Tokenizer(json, config);
    this.maxLength = spec.max_length;
    this.bos = spec.bos_token_id;
    this.eos = spec.eos_token_id;
    this.pad = spec.pad_token_id;
  }

  /** prompts: list of strings -> Int32Array of (B, max_length) ids, row-major. */
  encode(prompts) {
    const T = this.maxLength;
    const out = new Int32Array(prompts.length * T).fill(this.pad);
    prompts.forEach((prompt, row) => {
      const ids = this.tokenizer.encode(prompt, { add_special_tokens: false }).ids.slice(0, T - 2);
      out.set([this.bos, ...ids, this.eos], row * T);
    });
    return out;
  }
}
