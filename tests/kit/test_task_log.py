"""`backstop_tasks`: what an endpoint enqueued, asserted on without running it."""

from __future__ import annotations

import pytest

from tests.kit.conftest import RunKit

SERVICE = """
from __future__ import annotations

from datetime import datetime

from app import task


@task(name="mail.send")
def send(to: str, subject: str, body: str = "", urgent: bool = False) -> None:
    pass


@task(name="mail.at")
def send_at(to: str, at: datetime) -> None:
    pass
"""


def test_listing_and_matching_enqueued_tasks(pytester: pytest.Pytester, run_kit: RunKit) -> None:
    pytester.makepyfile(
        service=SERVICE,
        test_log="""
        from datetime import UTC, datetime

        import service
        from app.testing import Enqueued, TaskLog


        def test_all_and_enqueued(backstop_app, backstop_tasks, backstop_drain):
            assert isinstance(backstop_tasks, TaskLog)
            client = backstop_app.state.backstop.tasks
            first = client.add_task(service.send, "ada@example.test", "Hi")
            second = client.add_task("mail.send", to="bob@example.test", subject="Yo", urgent=True)
            other = client.add_task("log.append", "a line", queue="logs")

            waiting = backstop_tasks.enqueued()
            assert [item.id for item in waiting] == [first, second, other]
            mail, bob, line = waiting
            assert isinstance(mail, Enqueued)
            assert (mail.name, mail.args, mail.kwargs) == (
                "mail.send", ["ada@example.test", "Hi"], {}
            )
            assert mail.arguments == {"to": "ada@example.test", "subject": "Hi"}
            assert bob.arguments == {"to": "bob@example.test", "subject": "Yo", "urgent": True}
            assert (line.queue, line.status, line.task.id) == ("logs", "queued", other)
            assert [item.id for item in backstop_tasks.enqueued("mail.send")] == [first, second]
            assert [item.id for item in backstop_tasks.enqueued(service.send)] == [first, second]

            backstop_drain()

            assert backstop_tasks.enqueued() == []
            assert [item.status for item in backstop_tasks.all("mail.send")] == ["succeeded"] * 2
            assert [item.id for item in backstop_tasks.all(status="succeeded")] == [
                first, second, other
            ]


        def test_assert_enqueued_matches_by_parameter_as_stored(backstop_app, backstop_tasks):
            client = backstop_app.state.backstop.tasks
            task_id = client.add_task(service.send, "ada@example.test", subject="Hi")
            at = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
            later = client.add_task(service.send_at, "ada@example.test", at)

            for call in [
                (("ada@example.test", "Hi"), {}),
                (("ada@example.test",), {"subject": "Hi"}),
                ((), {"to": "ada@example.test", "subject": "Hi", "body": "", "urgent": False}),
            ]:
                args, kwargs = call
                assert backstop_tasks.assert_enqueued("mail.send", *args, **kwargs).id == task_id
            by_function = backstop_tasks.assert_enqueued(service.send, "ada@example.test", "Hi")
            assert by_function.id == task_id
            # A datetime compares in its stored (JSON) form.
            assert backstop_tasks.assert_enqueued("mail.at", "ada@example.test", at).id == later
            [stored] = backstop_tasks.enqueued("mail.at")
            assert stored.arguments["at"] == "2030-01-02T03:04:00Z"
        """,
    )

    result = run_kit()

    result.assert_outcomes(passed=2)


def test_assert_enqueued_fails_with_a_readable_message(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        service=SERVICE,
        test_failing="""
        import service


        def test_wrong_address(backstop_app, backstop_tasks, backstop_drain):
            client = backstop_app.state.backstop.tasks
            client.add_task(service.send, "bob@example.test", "Welcome")
            backstop_drain()
            client.add_task(service.send, "bob@example.test", "Welcome", urgent=True)
            client.add_task("log.append", "a line")
            backstop_tasks.assert_enqueued("mail.send", to="ada@example.test", subject="Welcome")


        def test_nothing_of_that_name(backstop_app, backstop_tasks):
            backstop_app.state.backstop.tasks.add_task("log.append", "a line")
            backstop_tasks.assert_enqueued("mail.send", "ada@example.test", "Welcome")


        def test_twice(backstop_app, backstop_tasks):
            client = backstop_app.state.backstop.tasks
            client.add_task(service.send, "ada@example.test", "Welcome")
            client.add_task(service.send, "ada@example.test", "Welcome")
            backstop_tasks.assert_enqueued("mail.send", "ada@example.test", "Welcome")


        def test_arguments_the_task_cannot_take(backstop_app, backstop_tasks):
            backstop_tasks.assert_enqueued("mail.send", "ada@example.test", "Hi", colour="red")
        """,
    )

    result = run_kit()

    result.assert_outcomes(failed=4)
    # fnmatch reads `[...]` as a set of characters: `?` stands in for the brackets.
    result.stdout.fnmatch_lines(
        [
            "*backstop_tasks.assert_enqueued(*",
            "E   *Failed: expected one waiting task "
            "mail.send(to='ada@example.test', subject='Welcome'), found 0",
            "E   *waiting 'mail.send' tasks (1):",
            "E   *  mail.send(to='bob@example.test', subject='Welcome', urgent=True)  ?queued?",
            "E   *'mail.send' tasks no longer waiting (1):",
            "E   *  mail.send(to='bob@example.test', subject='Welcome')  ?succeeded?",
            "test_failing.py:*: Failed",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E   *Failed: expected one waiting task "
            "mail.send(to='ada@example.test', subject='Welcome'), found 0",
            "E   *no 'mail.send' task is waiting; waiting tasks: log.append",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E   *Failed: expected one waiting task "
            "mail.send(to='ada@example.test', subject='Welcome'), found 2",
            "E   *waiting 'mail.send' tasks (2):",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E   *Failed: assert_enqueued: bad arguments for task 'mail.send': *colour*"]
    )
    # The failure points at the test's own line, not into the kit.
    result.stdout.no_fnmatch_line("*app/testing.py*")


def test_a_task_may_have_a_parameter_called_name(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        people="""
        from app import task


        @task(name="people.greet")
        def greet(name: str, greeting: str = "Hello") -> str:
            return f"{greeting}, {name}"
        """,
        test_people="""
        import pytest

        import people


        def test_by_keyword_positionally_and_by_function(backstop_app, backstop_tasks):
            task_id = backstop_app.state.backstop.tasks.add_task(people.greet, name="ada")

            assert backstop_tasks.assert_enqueued("people.greet", name="ada").id == task_id
            assert backstop_tasks.assert_enqueued("people.greet", "ada").id == task_id
            by_function = backstop_tasks.assert_enqueued(people.greet, name="ada", greeting="Hello")
            assert by_function.id == task_id
            missing = r"people\\.greet\\(name='bob'\\), found 0"
            with pytest.raises(pytest.fail.Exception, match=missing):
                backstop_tasks.assert_enqueued("people.greet", name="bob")
        """,
    )

    result = run_kit()

    result.assert_outcomes(passed=1)
