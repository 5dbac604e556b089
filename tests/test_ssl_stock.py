"""Issue 13: TLS contexts stocked in a spare's idle time are handed out once each, only for what they were made
from (same purpose, same unchanged CA file, same SSLKEYLOGFILE); anything else is made on the spot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

certifi = pytest.importorskip("certifi")

# each case runs in its own interpreter: install() patches the ssl module for the whole process
_PRELUDE = textwrap.dedent("""
    import os, ssl, sys
    from worker.hermes import ssl_stock
    bundle = sys.argv[1]
    ssl_stock.install()
    ssl_stock.forget()
""")


def _run(tmp_path, body: str) -> str:
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    env = {k: v for k, v in os.environ.items() if k != "SSLKEYLOGFILE"}
    out = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), str(bundle)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_stocked_context_is_handed_out_once_for_the_file_it_was_made_from(tmp_path):
    out = _run(tmp_path, """
        first = ssl.create_default_context(cafile=bundle)          # the rehearsal's demand: one context
        assert ssl_stock.stats["miss"] == 1
        assert ssl_stock.stock_asked(extra=1) == 2 and ssl_stock.stocked() == 2
        a = ssl.create_default_context(cafile=bundle)
        b = ssl.create_default_context(cafile=bundle)
        c = ssl.create_default_context(cafile=bundle)              # the stock is empty: made on the spot
        assert len({id(first), id(a), id(b), id(c)}) == 4          # never the same object twice
        assert dict(ssl_stock.stats) == {"miss": 2, "hit": 2}, ssl_stock.stats
        for ctx in (a, b, c):                                      # what create_default_context makes
            assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
            assert ctx.cert_store_stats()["x509_ca"] == first.cert_store_stats()["x509_ca"] > 0
        print("ok")
    """)
    assert out == "ok"


def test_an_edited_bundle_or_other_arguments_never_get_a_stocked_context(tmp_path):
    out = _run(tmp_path, """
        ssl.create_default_context(cafile=bundle)
        ssl_stock.stock_asked(extra=3)
        assert ssl_stock.stocked() == 4
        ssl.create_default_context(capath=os.path.dirname(bundle))  # another argument: not from the stock
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=bundle)
        os.environ["SSLKEYLOGFILE"] = bundle + ".keys"             # another key log: not from the stock
        keyed = ssl.create_default_context(cafile=bundle)
        assert keyed.keylog_filename == bundle + ".keys"
        del os.environ["SSLKEYLOGFILE"]
        assert ssl_stock.stocked() == 4 and ssl_stock.stats["hit"] == 0
        pem = open(bundle).read()
        first = pem[:pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\\n"
        with open(bundle, "w") as fh:                              # replaced: one certificate left
            fh.write(first)
        fresh = ssl.create_default_context(cafile=bundle)
        assert fresh.cert_store_stats()["x509_ca"] == 1            # read from the file as it is now
        assert ssl_stock.stats["hit"] == 0
        assert ssl_stock.release() == 4 and ssl_stock.stocked() == 0
        print("ok")
    """)
    assert out == "ok"
