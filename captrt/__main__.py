from captrt.cli import app

app(prog_name="captrt")
