// The patch page's review form: POST /api/reviews with the verdict, then show the result and reload the history.
(function () {
  "use strict";
  const form = document.getElementById("review-form");
  if (!form) return;
  const status = document.getElementById("review-status");
  let verdict = "accept";
  for (const button of form.querySelectorAll("button[name=verdict]")) {
    button.addEventListener("click", () => { verdict = button.value; });
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const reason = form.elements.reason.value;
    const details = form.elements.details.value.trim();
    const body = {
      patch_id: form.dataset.patch,
      agents_hash: form.dataset.agentsHash,
      slide_id: form.dataset.slide,
      verdict: verdict,
      reason: verdict === "reject" ? (details ? reason + ": " + details : reason) : (details || null),
      caption: verdict === "correct" ? form.elements.caption.value : null,
    };
    status.className = "";
    status.textContent = "saving…";
    try {
      const reply = await fetch("/api/reviews", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const answer = await reply.json();
      if (!reply.ok) throw new Error(answer.error || reply.statusText);
      status.className = "ok";
      status.textContent = "saved: " + answer.review.verdict + " by " + answer.review.reviewer + " (" + answer.key + ")";
      document.body.dataset.reviewSaved = answer.review.verdict;
    } catch (error) {
      status.className = "failed";
      status.textContent = "not saved: " + error.message;
    }
  });
})();
