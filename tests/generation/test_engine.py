"""The continuous-batching engine on the embedded model: slots refilled from the queue, requests joining
a running batch, live resizing, cancellation, and the slot cache's in-place writes."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from newsray.config import Config, DataConfig, ModelConfig
from newsray.errors import GenerationError
from newsray.generation import Generator, SlotCache, load_generator
from newsray.tasks import get_task


@pytest.fixture(scope="module")
def gen(embedded_model, data_dir) -> Generator:
    cfg = Config(data=DataConfig(task="news", root=str(data_dir)), model=ModelConfig(max_seq_length=1024, dtype="float32"))
    return load_generator("baseline", cfg, num_threads=2, slots=2)


@pytest.fixture(scope="module")
def prompts(data_dir):
    cfg = Config(data=DataConfig(task="news", root=str(data_dir)))
    return [e.messages() for e in get_task(cfg).load().test[:5]]


@pytest.fixture(scope="module")
def alone(gen, prompts):
    """Each prompt decoded alone (one slot in use): the reference text."""
    return {i: gen.generate([m], 12 + 4 * i)[0] for i, m in enumerate(prompts)}


def test_slot_cache_writes_in_place_and_reads_a_view():
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=3, num_attention_heads=9, hidden_size=576, head_dim=64)
    c = SlotCache(config, slots=4, length=16, dtype=torch.float32, device="cpu")
    k, v = torch.randn(2, 3, 5, 64), torch.randn(2, 3, 5, 64)
    c.write, c.read = (torch.tensor([[3], [1]]), torch.arange(5)[None, :]), None
    out_k, _ = c.update(k, v, 1)
    assert out_k is k  # a prefill attends to its own keys
    assert torch.equal(c.keys[1][3, :, :5], k[0]) and torch.equal(c.values[1][1, :, :5], v[1])
    one = torch.randn(4, 3, 1, 64)
    c.write, c.read = (torch.arange(4)[:, None], torch.tensor([[5], [5], [0], [5]])), (4, 6)
    rk, _ = c.update(one, one, 1)
    assert rk.shape == (4, 3, 6, 64) and rk.data_ptr() == c.keys[1].data_ptr()  # a view of the buffer: no copy
    assert torch.equal(c.keys[1][3, :, 5], one[3, :, 0]) and torch.equal(c.keys[1][3, :, :5], k[0])
    c.grow(32)
    assert c.keys[1].shape[2] == 32 and torch.equal(c.keys[1][3, :, :5], k[0])


@pytest.mark.slow
def test_more_rows_than_slots_refill_as_rows_finish(gen, prompts, alone):
    """5 rows on 2 slots: a freed slot takes the next row at the next step; every text is the row's text alone."""
    reqs = [gen.request(m, 12 + 4 * i) for i, m in enumerate(prompts)]
    done = gen.engine.run(reqs)
    assert [gen.result(r) for r in done] == [alone[i] for i in range(5)]
    assert max(sum(r.admitted_step <= s < r.finished_step for r in reqs) for s in range(max(r.finished_step for r in reqs))) <= 2
    first_free = min(reqs[0].finished_step, reqs[1].finished_step)
    assert reqs[2].admitted_step == first_free  # refilled at once, not after the whole first batch
    assert reqs[2].admitted_step < max(reqs[0].finished_step, reqs[1].finished_step)


@pytest.mark.slow
def test_a_request_joins_the_running_batch(gen, prompts, alone):
    """Online: a short request submitted while a long one decodes starts at the next step and ends first."""
    reference = gen.generate([prompts[4]], 28)[0]
    assert reference.finish_reason == "length"  # the untrained model writes prose to the budget
    long = gen.request(prompts[4], 28)
    gen.engine.submit(long)
    while long.admitted_step < 0 or gen.engine.steps - long.admitted_step < 3:
        time.sleep(0.01)
    short = gen.request(prompts[0], 12)
    assert gen.result(gen.engine.submit(short).result(timeout=300)) == alone[0]
    assert gen.result(long.future.result(timeout=300)) == reference
    assert long.admitted_step < short.admitted_step < long.finished_step  # joined while the long one ran
    assert short.finished_step < long.finished_step


@pytest.mark.slow
def test_slots_grow_live_and_cancelled_requests_leave(gen, prompts, alone):
    gen.engine.set_slots(1)
    reqs = [gen.request(m, 12 + 4 * i) for i, m in enumerate(prompts[:4])]
    futures = [gen.engine.submit(r) for r in reqs]
    futures[3].cancel()  # still queued: never takes a slot
    while reqs[0].admitted_step < 0:
        time.sleep(0.01)
    gen.engine.set_slots(3)  # rows in flight keep their cache
    assert [gen.result(f.result(timeout=300)) for f in futures[:3]] == [alone[i] for i in range(3)]
    assert reqs[3].admitted_step == -1
    assert max(r.admitted_step for r in reqs[1:3]) < reqs[0].finished_step  # the new slots were used at once
    gen.engine.set_slots(2)


def test_the_engine_thread_decodes_with_the_threads_it_was_given(embedded_model, data_dir, prompts):
    """torch.set_num_threads holds for the calling thread; the engine decodes in a thread of its own, which starts at
    one OpenMP thread per core until torch's first parallel op there re-applies the count. The engine sets it before its
    first step (without that, this test saw [2, 1, 1] over the steps: the first step's start ran on both cores)."""
    from contextlib import contextmanager

    from threadpoolctl import threadpool_info  # OpenMP's thread count as the calling thread sees it

    seen: list[int | None] = []
    torch_dir = str(Path(torch.__file__).parent)  # torch's own libgomp: scikit-learn (through mlflow) loads another one

    @contextmanager
    def record():  # the engine runs each step inside its context, in its own thread
        seen.append(next((i["num_threads"] for i in threadpool_info()
                          if i["user_api"] == "openmp" and i["filepath"].startswith(torch_dir)), None))
        yield

    before = torch.get_num_threads()
    try:
        cfg = Config(data=DataConfig(task="news", root=str(data_dir)), model=ModelConfig(max_seq_length=1024, dtype="float32"))
        one = load_generator("baseline", cfg, num_threads=1, slots=1)
        one.engine.context = record
        one.generate([prompts[0]], 4)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}, seen


@pytest.mark.slow
def test_rows_longer_than_the_window_still_decode(gen, prompts, alone):
    """A prompt past model.max_seq_length is warned about, not an index error: the cache grows to what a row needs."""
    from newsray.generation import Engine, Request

    small = Engine(gen.model, slots=1, stop_ids=gen.stop_ids, token_texts=gen.token_texts, pad_id=gen.pad_id, max_length=64)
    prompt = gen.formatter.prompt_ids(prompts[0])
    assert len(prompt) > 64
    (req,) = small.run([Request(prompt, 12, json_stop=True)])
    assert small.cache.length >= len(prompt) + 12
    assert gen.result(req) == alone[0]
    small.close()


@pytest.mark.slow
def test_a_row_whose_grammar_fails_ends_alone_as_data(gen, prompts, alone):
    """A row whose matcher is in error (a grammar llguidance rejects) ends at once, as data (no exception);
    the row beside it in the same batch decodes exactly as it does alone. (With SmolLM2 an all-forbidden
    mask lands on token 0, its EOS: the row stops; a token the matcher refuses ends it as "error".)"""
    from llguidance import LLMatcher

    broken = gen.request(prompts[0], 12, constrained=True)
    broken.grammar.matcher = LLMatcher(broken.grammar.c.ll_tokenizer, '{"grammars": [{"lark_grammar": "start: ("}]}', log_level=0)
    assert broken.grammar.matcher.is_error()  # a real llguidance matcher, really broken
    fine = gen.request(prompts[1], 16)
    done = gen.engine.run([broken, fine])
    assert done[0].reason in ("stop", "error") and len(done[0].tokens) == 1 and gen.result(done[0]).text == ""
    assert gen.result(done[1]) == alone[1]
    g = gen.request(prompts[0], 12, constrained=True).grammar
    with pytest.raises(GenerationError, match="left its grammar at token 0"):  # what the engine turns into reason "error"
        g.consume(gen.tokenizer(" 5", add_special_tokens=False)["input_ids"][0])


@pytest.mark.parametrize("task", ["agnews", "news"])
def test_a_tokenizer_the_grammar_cannot_use_is_one_sentence(task):
    """A real word-level tokenizer (no byte decoding: llguidance cannot map its tokens to bytes) with constrained decoding:
    a GenerationError naming the fix, not llguidance's ValueError."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from newsray.generation.grammar import TaskConstraint

    vocab = {"[UNK]": 0, "</s>": 1, "World": 2, "Sports": 3, "Business": 4}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="[UNK]")
    with pytest.raises(GenerationError, match=f"the {task} answer grammar cannot be expressed with this model's tokenizer .*"
                                              r"run without constrained decoding \(eval.constrained=false / serve.constrained=false\)"):
        TaskConstraint(tok, task, [1], [tok.convert_ids_to_tokens(i) for i in range(len(vocab))])
