// The sign-in page of a deployed console or station page: posts the token once; the server
// keeps it in an HttpOnly cookie and checks it again on every request.

const form = document.getElementById("login");
const alertBox = document.getElementById("refusal");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  alertBox.hidden = true;
  const token = document.getElementById("token").value.trim();
  const response = await fetch("/api/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (response.ok) {
    window.location.assign("/");
    return;
  }
  let message = response.statusText;
  try { message = (await response.json()).error || message; } catch { /* not JSON */ }
  alertBox.textContent = `Not signed in: ${message}`;
  alertBox.hidden = false;
});
