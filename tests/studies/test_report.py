import json

from multitoken.studies.report import Report, format_table


def test_report_leads_with_question_answer_and_plot(tmp_path):
    report = Report(tmp_path / "r", title="T", question="Does it work?")
    fig, ax = report.figure()
    ax.plot([1, 2], [3, 4])
    report.save_figure(fig, "curve.png", "A curve")
    report.add_table(["a", "b"], [[1, 0.123456]], caption="Numbers")
    path = report.write(answer="Yes, by 3 points.", results={"x": 1}, command=["multitoken", "lab", "x"])
    text = path.read_text().splitlines()
    assert text[0] == "# T" and text[2].startswith("**Question.**") and "Yes, by 3 points." in text[4]
    assert text.index("![A curve](curve.png)") < text.index("**Numbers**")
    assert "| 1 | 0.1235 |" in text and "multitoken lab x" in text
    assert (tmp_path / "r" / "curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "r" / "results.json").read_text())["results"] == {"x": 1}


def test_format_table():
    assert format_table(["n"], [[2]]) == "| n |\n|---|\n| 2 |"
