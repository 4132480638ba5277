"""scripts/book_cache.py empties jupyter-cache exactly when the code behind the notebooks changed."""

from __future__ import annotations


def test_cache_is_kept_while_the_code_is_unchanged_and_emptied_when_it_changes(
    load_script, tmp_path, monkeypatch
):
    book_cache = load_script("book_cache")
    cache = tmp_path / ".jupyter_cache"
    assert book_cache.main(cache) == 0 and (cache / "lmpg-code-stamp").is_file()
    executed = cache / "executed-notebook"
    executed.write_text("outputs")
    book_cache.main(cache)
    assert executed.is_file()  # same code: the executed notebooks are reused
    monkeypatch.setattr(
        book_cache, "code_stamp", lambda: "lmpg_utils 0123\n"
    )  # the package was edited
    book_cache.main(cache)
    assert (
        not executed.exists()
        and (cache / "lmpg-code-stamp").read_text() == "lmpg_utils 0123\n"
    )


def test_stamp_names_the_package_hash_torch_and_requirements(load_script):
    from lmpg_utils.caching import source_hash

    stamp = load_script("book_cache").code_stamp()
    assert source_hash() in stamp and "torch " in stamp and "requirements " in stamp
