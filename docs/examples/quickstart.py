from flask import Flask

from dashboard import Int, QueueExtension, Registry, current_queue
from dashboard.web import bp as dashboard_bp

registry = Registry()  # your task kinds: only these can run


@registry.task("send_report", params={"user_id": Int(1, 10**9)})
def send_report(ctx, user_id):
    ctx.progress(0.5, "building")  # shows on the dashboard, live
    return f"report-{user_id}.pdf"  # kept with the task


app = Flask(__name__)
QueueExtension(app, registry=registry)  # workers start with the first request
app.register_blueprint(dashboard_bp, url_prefix="/queue")  # the dashboard


@app.post("/reports/<int:user_id>")
def order_report(user_id):
    return {"id": current_queue.submit("send_report", user_id=user_id)}, 202
