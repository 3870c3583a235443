// The tutorial's client, unchanged in spirit: append every message, stop at the marker.
const output = document.getElementById("output");
document.getElementById("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  output.textContent = "";
  document.body.dataset.state = "streaming";
  const prompt = document.getElementById("prompt").value;
  const source = new EventSource("/stream?prompt=" + encodeURIComponent(prompt));
  source.onmessage = (message) => {
    if (message.data === "[STREAM_END]") {
      source.close();
      document.body.dataset.state = "done";
      return;
    }
    output.textContent += message.data;
  };
});
