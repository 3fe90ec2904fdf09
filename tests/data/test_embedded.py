import re

from frontier_jax.data import embedded


def test_embedded_code_is_sorted_stdlib_files_read_the_same_twice():
    files = embedded.stdlib_code_files()
    assert files == sorted(files) and len(files) > 50 and all(f.endswith(".py") for f in files)
    first, second = embedded.code_dataset(), embedded.code_dataset()
    assert len(first) == len(files)
    assert first[3] == second[3] == open(files[3], encoding="utf-8").read()


def test_embedded_math_is_a_function_of_seed_and_index():
    ds = embedded.math_dataset(seed=7)
    assert len(ds) == embedded.MATH_LENGTH
    assert [ds[i] for i in range(50)] == [embedded.math_problem(7, i) for i in range(50)]
    assert [ds[i] for i in range(50)] != [embedded.math_problem(8, i) for i in range(50)]
    assert len({ds[i] for i in range(200)}) > 190


def test_embedded_math_answers_are_correct():
    pattern = re.compile(r"Q: ([-+*() 0-9]+) = \?\nA: (-?\d+)\n")
    for i in range(500):
        match = pattern.fullmatch(embedded.math_problem(1, i))
        assert match, embedded.math_problem(1, i)
        assert eval(match.group(1)) == int(match.group(2))  # the regex admits only arithmetic
