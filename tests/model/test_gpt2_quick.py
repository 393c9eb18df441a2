import torch
import transformers

from interplab import load_model


def test_gpt2_parity(tmp_path):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    tokens = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
