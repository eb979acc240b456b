"""The pytest plugin, run in real pytest sessions (pytester, each in a subprocess)."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

SUITE = textwrap.dedent(
    """
    import threading

    import flask
    import pytest
    from flask import Flask, current_app

    import ctxtrace

    app = Flask("plugin-shop")


    def test_clean():
        with app.app_context():
            assert current_app.name == "plugin-shop"


    def test_leaks():
        app.app_context().push()  # site: leak


    def test_next_test_starts_clean():
        assert not flask.has_app_context()


    def test_thread_reads_config():
        def job():
            current_app.config["DEBUG"]  # site: access
        thread = threading.Thread(target=job, name="mailer")
        thread.start()
        thread.join()


    def test_thread_falls_back_without_a_context():
        def job():
            try:
                current_app.config["DEBUG"]
            except RuntimeError:
                pass
        thread = threading.Thread(target=job, name="fallback")
        thread.start()
        thread.join()


    @pytest.mark.ctxtrace_allow("leaked")
    def test_leaks_on_purpose():
        app.app_context().push()


    @pytest.mark.ctxtrace_allow
    def test_anything_goes():
        app.app_context().push()
        try:
            current_app.name
        except RuntimeError:
            pass


    def test_sees_the_instrumentation():
        print("instrumented:", ctxtrace.is_instrumented())
    """
)


def line(marker: str) -> int:
    """The line of a marker in the file pytester writes (it drops the leading newline)."""
    for number, text in enumerate(SUITE.strip("\n").splitlines(), start=1):
        if text.rstrip().endswith(f"# site: {marker}"):
            return number
    raise LookupError(marker)


def test_inert_unless_enabled(pytester: pytest.Pytester) -> None:
    """Installed but not enabled: nothing is instrumented and nothing fails."""
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=7, failed=1)  # the next test sees the leak: no repair
    result.stdout.fnmatch_lines(["*instrumented: False*"])
    result.stdout.no_fnmatch_line("*ctxtrace:*")


def test_enabled_by_option_fails_leaks_and_accesses(pytester: pytest.Pytester) -> None:
    """--ctxtrace: a leak errors at teardown, an access fails the test; both name the site."""
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--ctxtrace")
    # test_leaks passes its call and errors at teardown, when the leak is known.
    result.assert_outcomes(passed=7, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "*ctxtrace: leaked: app context of app 'plugin-shop' pushed at "
            f"test_suite.py:{line('leak')} in test_leaks (thread MainThread) is still pushed "
            "when test test_suite.py::test_leaks ended; ctxtrace popped it after the test*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*FAILED test_suite.py::test_thread_reads_config*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ctxtrace: out_of_context_access: current_app used with no context at "
            f"test_suite.py:{line('access')} in test_thread_reads_config.<locals>.job "
            "(runtime, thread mailer, unit thread mailer, started by test "
            "test_suite.py::test_thread_reads_config): RuntimeError: Working outside of "
            "application context.*",
        ]
    )
    result.stdout.fnmatch_lines(["ctxtrace: checking every test*"])
    result.stdout.fnmatch_lines(["*instrumented: True*"])


def test_enabled_by_ini(pytester: pytest.Pytester) -> None:
    """``ctxtrace = true`` in the ini file turns it on, as --ctxtrace does."""
    pytester.makeini("[pytest]\nctxtrace = true\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, failed=1, errors=1)


def test_access_in_a_fixture_fails_the_setup(pytester: pytest.Pytester) -> None:
    """An out-of-context access whose error fails a fixture is named at setup."""
    pytester.makepyfile(
        test_fixture="""
        import pytest
        from flask import current_app

        @pytest.fixture
        def settings():
            return current_app.config

        def test_uses_settings(settings):
            assert settings == {}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_uses_settings*",
            "ctxtrace: out_of_context_access: current_app used with no context at "
            "test_fixture.py:6 in settings (runtime, thread MainThread, unit test "
            "test_fixture.py::test_uses_settings)*",
        ]
    )


def test_accesses_the_code_catches_do_not_fail(pytester: pytest.Pytester) -> None:
    """A fallback that catches the RuntimeError, or pytest.raises around it: no failure."""
    pytester.makepyfile(
        test_handled="""
        import pytest
        from flask import current_app

        @pytest.fixture
        def settings():
            try:
                return current_app.config
            except RuntimeError:
                return {}

        def test_uses_settings(settings):
            assert settings == {}

        def test_expects_the_error():
            with pytest.raises(RuntimeError, match="application context"):
                current_app.name

        def test_sees_it_as_handled(ctxtrace_events):
            with pytest.raises(RuntimeError):
                current_app.name
            [access] = ctxtrace_events.accesses()
            assert access.outcome == "handled"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(passed=3)
    result.stdout.no_fnmatch_line("*ctxtrace: out_of_context_access*")


def test_contexts_of_broader_fixtures_are_not_a_tests_leak(pytester: pytest.Pytester) -> None:
    """A module fixture keeps an app context pushed across tests: no test leaked it."""
    pytester.makepyfile(
        test_module_fixture="""
        import pytest
        from flask import Flask, current_app

        app = Flask("module-ctx")

        @pytest.fixture(scope="module")
        def app_ctx():
            with app.app_context():
                yield

        @pytest.fixture
        def name(app_ctx):
            return current_app.name

        def test_first(name):
            assert name == "module-ctx"

        def test_second(app_ctx):
            assert current_app.name == "module-ctx"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(passed=2)


def test_events_fixture_and_tests_that_manage_ctxtrace(pytester: pytest.Pytester) -> None:
    """ctxtrace_events lists what the agent saw; a test that takes ctxtrace over is not judged."""
    pytester.makepyfile(
        test_events="""
        import pytest
        from flask import Flask, current_app

        import ctxtrace

        @pytest.mark.ctxtrace_allow("out_of_context_access")
        def test_events(ctxtrace_events):
            with pytest.raises(RuntimeError):
                current_app.name
            [access] = ctxtrace_events.accesses()
            assert access.proxy == "current_app"
            assert ctxtrace_events.anomalies() == []

        def test_takes_over():
            ctxtrace.uninstrument()
            assert ctxtrace.instrument(metrics="none")
            Flask("own").app_context().push()
            ctxtrace.uninstrument()
            from flask import globals as g
            g._cv_app.get().pop()

        def test_plugin_is_back(ctxtrace_events):
            assert ctxtrace.is_instrumented()
            assert len(ctxtrace_events) == 0
        """
    )
    # Without --ctxtrace the fixture turns ctxtrace on for its own test only.
    for options in ([], ["--ctxtrace"]):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *options)
        result.assert_outcomes(passed=3)


def test_unknown_anomaly_in_the_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """A typo in ctxtrace_allow is reported, not silently allowed."""
    pytester.makepyfile(
        test_typo="""
        import pytest

        @pytest.mark.ctxtrace_allow("leak")
        def test_typo():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.stdout.fnmatch_lines(["*unknown anomaly 'leak' in @pytest.mark.ctxtrace_allow*"])
    assert result.ret != 0


SCOPES = textwrap.dedent(
    """
    import pytest
    from flask import Flask, current_app

    app = Flask("scopes")


    @pytest.fixture(scope="module")
    def module_ctx():
        ctx = app.app_context()
        ctx.push()
        yield ctx
        ctx.pop()


    @pytest.fixture(scope="class")
    def class_ctx(module_ctx):
        ctx = app.app_context()
        ctx.push()
        yield ctx
        ctx.pop()


    @pytest.mark.usefixtures("class_ctx")
    class TestInTheClass:
        def test_first(self):
            assert current_app.name == "scopes"

        def test_last(self, module_ctx):
            assert current_app._get_current_object() is module_ctx.app


    def test_after_the_class(module_ctx):
        assert current_app.name == "scopes"
    """
)


def test_contexts_of_live_wider_fixtures_are_never_popped(pytester: pytest.Pytester) -> None:
    """A class fixture's context over a module fixture's: the plugin pops neither."""
    pytester.makepyfile(test_scopes=SCOPES)
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    plain.assert_outcomes(passed=3)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(passed=3)
    result.stdout.no_fnmatch_line("*LookupError*")
    result.stderr.no_fnmatch_line("*double_pop*")
    result.stderr.no_fnmatch_line("*ctxtrace.*")


def test_a_wider_fixture_set_up_inside_a_test_is_not_the_tests(pytester: pytest.Pytester) -> None:
    """A module fixture first asked for by a function fixture (``getfixturevalue``) is set up
    inside the test: its context is still the fixture's, neither leaked nor stale."""
    pytester.makepyfile(
        test_lazy="""
        import pytest
        from flask import Flask, current_app

        app = Flask("lazy")

        @pytest.fixture(scope="module")
        def module_ctx():
            ctx = app.app_context()
            ctx.push()
            yield ctx
            ctx.pop()

        @pytest.fixture
        def uses_it(request):
            return request.getfixturevalue("module_ctx")

        def test_first(uses_it):
            assert current_app.name == "lazy"

        def test_second(module_ctx):
            assert current_app.name == "lazy"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(passed=2)
    result.stderr.no_fnmatch_line("*ctxtrace.*")


def test_unittest_class_and_module_contexts_are_never_popped(pytester: pytest.Pytester) -> None:
    """unittest's setUpModule and setUpClass own their contexts until their tear-downs."""
    pytester.makepyfile(
        test_unittest_scopes="""
        import unittest
        from flask import Flask, current_app

        app = Flask("unittest-scopes")
        module_ctx = app.app_context()

        def setUpModule():
            module_ctx.push()

        def tearDownModule():
            module_ctx.pop()

        class TestWithAClassContext(unittest.TestCase):
            @classmethod
            def setUpClass(cls):
                cls.ctx = app.app_context()
                cls.ctx.push()

            @classmethod
            def tearDownClass(cls):
                cls.ctx.pop()

            def test_in_the_class(self):
                self.assertEqual(current_app.name, "unittest-scopes")

        class TestAfter(unittest.TestCase):
            def test_after_the_class(self):
                self.assertEqual(current_app.name, "unittest-scopes")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*LookupError*")
    result.stderr.no_fnmatch_line("*ctxtrace.*")


def test_a_context_that_outlives_its_fixture_fails_the_teardown_that_ends_it(
    pytester: pytest.Pytester,
) -> None:
    """A class fixture (or setUpClass) that never pops: the last test of its class errors."""
    pytester.makepyfile(
        test_outlives="""
        import unittest

        import flask
        import pytest
        from flask import Flask, current_app

        app = Flask("outlives")

        @pytest.fixture(scope="class")
        def class_ctx():
            app.app_context().push()
            yield

        @pytest.mark.usefixtures("class_ctx")
        class TestFixture:
            def test_one(self):
                assert current_app.name == "outlives"

            def test_two(self):
                assert current_app.name == "outlives"

        class TestSetUpClass(unittest.TestCase):
            @classmethod
            def setUpClass(cls):
                app.app_context().push()

            def test_three(self):
                self.assertEqual(current_app.name, "outlives")

        def test_starts_clean():
            assert not flask.has_app_context()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ctxtrace")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of TestFixture.test_two*",
            "*ctxtrace: leaked: app context of app 'outlives' pushed at test_outlives.py:11 "
            "in class_ctx by the class-scoped fixture 'class_ctx' is still pushed after "
            "that fixture's teardown; ctxtrace popped it after the test*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of TestSetUpClass.test_three*",
            "*ctxtrace: leaked: app context of app 'outlives' pushed at test_outlives.py:25 "
            "in TestSetUpClass.setUpClass by the class-scoped fixture "
            "'_unittest_setUpClass_fixture_TestSetUpClass' is still pushed after that "
            "fixture's teardown; ctxtrace popped it after the test*",
        ]
    )
